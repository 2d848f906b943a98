//! The `metrics` service (issue 15): HTTP byte by byte, counters after known traffic,
//! refusals by reason, `promtool check metrics` on a live daemon's output, and a real
//! Prometheus server scraping it. promtool and prometheus come from the Debian package
//! `prometheus`, which CI installs (without starting it).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

/// A configuration with a pid file, two workers and one listener per entry of
/// `listeners`: (name, service, extra lines), all on 127.0.0.1:0.
fn config(listeners: &[(&str, &str, &str)]) -> String {
    let mut config = String::from(
        "[daemon]\nworkers = 2\ngraceful_timeout = \"10s\"\nallow_root_workers = true\n\
         pid_file = \"@DIR@/preforkd.pid\"\n\
         [log]\nlevel = \"debug\"\naccess_log = true\n",
    );
    for (name, service, extra) in listeners {
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nservice = \"{service}\"\n{extra}\n"
        ));
    }
    config
}

/// Starts `config` and waits until `status` shows both workers ready.
fn start(config: &str) -> Daemon {
    let daemon = Daemon::start(config);
    eventually("2 workers ready in status", || ready_in_status(&daemon.config_path) == 2);
    daemon
}

/// Sends `request` on a fresh connection to `addr` and reads until the server closes:
/// (head, body).
fn http(addr: SocketAddr, request: &[u8]) -> (String, Vec<u8>) {
    let mut stream = connect(addr);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the server closes after its answer");
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&answer)));
    let head = String::from_utf8(answer[..end + 2].to_vec()).expect("an ASCII head");
    (head, answer[end + 4..].to_vec())
}

/// The metrics of the daemon whose metrics listener is `addr`, as text 0.0.4.
pub fn scrape(addr: SocketAddr) -> String {
    let (head, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: preforkd\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    String::from_utf8(body).expect("UTF-8 metrics")
}

/// The value of `series` (name and labels, as written) in `metrics`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `series` reads `expected`; for a counter (`_total`), fails at once if it ever
/// reads more (counters only grow, so more would never come back down).
fn expect_sample(addr: SocketAddr, series: &str, expected: f64) {
    let counter = series.split('{').next().unwrap().ends_with("_total");
    let mut last = String::new();
    eventually(&format!("{series} == {expected}"), || {
        last = scrape(addr);
        let value = sample(&last, series);
        assert!(
            !counter || value.is_none_or(|v| v <= expected),
            "{series} is {value:?}, over {expected}:\n{last}"
        );
        value == Some(expected)
    });
}

#[test]
fn metrics_speaks_http_status_codes_and_content_types() {
    let daemon = start(&config(&[
        ("echo", "echo", ""),
        ("metrics", "metrics", "[listener.options]\nrequest_timeout = \"300ms\""),
    ]));
    let metrics = daemon.addrs[1];
    let (head, body) = http(metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("# TYPE preforkd_generation gauge\npreforkd_generation 1\n"), "{text}");
    assert!(!text.contains("# EOF"), "no OpenMetrics trailer in text 0.0.4");

    let accept = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n";
    let (head, body) = http(metrics, accept);
    assert!(
        head.contains(
            "\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{head}"
    );
    assert!(body.ends_with(b"# EOF\n"));

    let (head, body) = http(metrics, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && body.is_empty(), "{head}");
    let cases: [(&[u8], &str); 6] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "404 Not Found"),
        (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
            "405 Method Not Allowed",
        ),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", "505 HTTP Version Not Supported"),
        // Never finished: answered once request_timeout passes.
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", "408 Request Timeout"),
    ];
    for (request, status) in cases {
        let (head, body) = http(metrics, request);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{head}");
        assert_eq!(body, format!("{status}\n").as_bytes());
        if status.starts_with("405") {
            assert!(head.contains("\r\nAllow: GET, HEAD\r\n"), "{head}");
        }
    }
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 9000));
    let (head, _) = http(metrics, &huge);
    assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{head}");
}

#[test]
fn metrics_count_known_traffic_per_listener() {
    let daemon =
        start(&config(&[("echo", "echo", ""), ("other", "echo", ""), ("metrics", "metrics", "")]));
    let (echo, other, metrics) = (daemon.addrs[0], daemon.addrs[1], daemon.addrs[2]);
    for i in 0..3 {
        let mut stream = connect(echo);
        assert_eq!(exchange(&mut stream, b"hello", QUICK), Outcome::Echoed, "exchange {i}");
    }
    let mut held = connect(other);
    assert_eq!(exchange(&mut held, b"0123456789", QUICK), Outcome::Echoed);
    let series = [
        ("preforkd_listener_accepted_connections_total{listener=\"echo\"}", 3.0),
        ("preforkd_listener_received_bytes_total{listener=\"echo\"}", 15.0),
        ("preforkd_listener_sent_bytes_total{listener=\"echo\"}", 15.0),
        (
            "preforkd_listener_closed_connections_total{listener=\"echo\",reason=\"client-close\"}",
            3.0,
        ),
        ("preforkd_listener_open_connections{listener=\"echo\"}", 0.0),
        ("preforkd_listener_accepted_connections_total{listener=\"other\"}", 1.0),
        ("preforkd_listener_received_bytes_total{listener=\"other\"}", 10.0),
        ("preforkd_listener_open_connections{listener=\"other\"}", 1.0),
    ];
    for (name, value) in series {
        expect_sample(metrics, name, value);
    }
    let text = scrape(metrics);
    for reason in ["denied", "rate", "limit", "listener-full", "shed", "proxy-header", "over-share"]
    {
        let name = format!(
            "preforkd_listener_refused_connections_total{{listener=\"echo\",reason=\"{reason}\"}}"
        );
        assert_eq!(sample(&text, &name), Some(0.0), "{name}:\n{text}");
    }
    let slots = text.lines().filter(|l| l.starts_with("preforkd_worker_generation{")).count();
    assert_eq!(slots, 2, "one series per live worker:\n{text}");
    let ready = text.lines().filter(|l| l.contains("state=\"ready\"} 1")).count();
    assert_eq!(ready, 2, "{text}");
    // Closing the held connection moves it from open to closed.
    drop(held);
    expect_sample(metrics, "preforkd_listener_open_connections{listener=\"other\"}", 0.0);
    let closed =
        "preforkd_listener_closed_connections_total{listener=\"other\",reason=\"client-close\"}";
    expect_sample(metrics, closed, 1.0);
    // status --json reads the same rows.
    let config = daemon.config_path.to_str().unwrap();
    let (status, stdout, stderr) = run_cli(&["status", "--json", "-c", config]);
    assert_eq!(code(status), 0, "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let listeners = document["listeners"].as_array().expect("listeners");
    let echo = listeners.iter().find(|l| l["name"] == "echo").expect("the echo listener");
    assert_eq!((&echo["accepted"], &echo["bytes_in"]), (&3.into(), &15.into()), "{echo}");
    assert_eq!(echo["closed"]["client-close"], 3, "{echo}");
    assert_eq!(echo["refused"]["denied"], 0, "{echo}");
}

#[test]
fn metrics_count_refusals_by_reason() {
    let guarded = "deny = [\"127.0.0.2\"]\nmax_connections_per_client = 1";
    let daemon = start(&config(&[("guarded", "echo", guarded), ("metrics", "metrics", "")]));
    let (addr, metrics) = (daemon.addrs[0], daemon.addrs[1]);
    let mut denied = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr);
    assert_eq!(exchange(&mut denied, b"hello", QUICK), Outcome::Closed);
    let mut first = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr);
    assert_eq!(exchange(&mut first, b"hello", QUICK), Outcome::Echoed);
    let mut second = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr);
    assert_eq!(
        exchange(&mut second, b"hello", QUICK),
        Outcome::Closed,
        "over the per-client limit"
    );
    let refused = |reason: &str| {
        format!(
            "preforkd_listener_refused_connections_total{{listener=\"guarded\",reason=\"{reason}\"}}"
        )
    };
    expect_sample(metrics, &refused("denied"), 1.0);
    expect_sample(metrics, &refused("limit"), 1.0);
    let text = scrape(metrics);
    assert_eq!(sample(&text, &refused("rate")), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "preforkd_listener_accepted_connections_total{listener=\"guarded\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "preforkd_listener_open_connections{listener=\"guarded\"}"),
        Some(1.0)
    );
}

#[test]
fn promtool_accepts_a_live_daemons_metrics() {
    let daemon = start(&config(&[("echo", "echo", ""), ("metrics", "metrics", "")]));
    let mut stream = connect(daemon.addrs[0]);
    assert_eq!(exchange(&mut stream, b"hello", QUICK), Outcome::Echoed);
    drop(stream);
    let closed =
        "preforkd_listener_closed_connections_total{listener=\"echo\",reason=\"client-close\"}";
    expect_sample(daemon.addrs[1], closed, 1.0);
    let text = scrape(daemon.addrs[1]);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "promtool check metrics: {:?}\n{stdout}{stderr}\n{text}",
        out.status
    );
    assert!(
        stdout.trim().is_empty() && stderr.trim().is_empty(),
        "lint findings: {stdout}{stderr}"
    );
}

/// A Prometheus server we started; killed (by its pid, which is our child's) on drop.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("prometheus.log"));
            eprintln!("--- prometheus log ---\n{}", log.unwrap_or_default());
        }
    }
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second, on a loopback port chosen by
    /// binding port 0, with its data in a temporary directory.
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: preforkd\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus; .ci/run installs it)");
        Prometheus { child, dir, addr }
    }

    /// The value of `query` (an instant vector of one series) through the HTTP API, if the
    /// server answers and has it.
    fn query(&mut self, query: &str) -> Option<f64> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the Prometheus server exited ({status}): it could not start; its log says why");
        }
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let mut stream = TcpStream::connect_timeout(&self.addr, QUICK).ok()?;
        stream.set_read_timeout(Some(QUICK)).unwrap();
        let request =
            format!("GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let body = answer.split_once("\r\n\r\n")?.1;
        let document: serde_json::Value = serde_json::from_str(body).ok()?;
        let result = document["data"]["result"].as_array()?;
        let value = result.first()?["value"][1].as_str()?;
        value.parse().ok()
    }

    /// Waits (up to a minute: the server starts, then scrapes every second) until `query`
    /// reads `expected`.
    fn expect(&mut self, query: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while last != Some(expected) {
            assert!(Instant::now() < deadline, "{query} is {last:?} in Prometheus, not {expected}");
            std::thread::sleep(Duration::from_millis(200));
            last = self.query(query);
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_the_metrics_listener() {
    let daemon = start(&config(&[("echo", "echo", ""), ("metrics", "metrics", "")]));
    for _ in 0..2 {
        let mut stream = connect(daemon.addrs[0]);
        assert_eq!(exchange(&mut stream, b"hello", QUICK), Outcome::Echoed);
    }
    let mut prometheus = Prometheus::start(daemon.addrs[1]);
    prometheus.expect("up{job=\"preforkd\"}", 1.0);
    prometheus.expect("preforkd_listener_accepted_connections_total{listener=\"echo\"}", 2.0);
    prometheus.expect("preforkd_generation", 1.0);
}

#[test]
fn counters_survive_killed_workers_and_restarts_are_counted() {
    let daemon = start(&config(&[("echo", "echo", ""), ("metrics", "metrics", "")]));
    let (echo, metrics) = (daemon.addrs[0], daemon.addrs[1]);
    for _ in 0..2 {
        let mut stream = connect(echo);
        assert_eq!(exchange(&mut stream, b"hello", QUICK), Outcome::Echoed);
    }
    let accepted = "preforkd_listener_accepted_connections_total{listener=\"echo\"}";
    expect_sample(metrics, accepted, 2.0);
    let (status, stdout, stderr) =
        run_cli(&["status", "--json", "-c", daemon.config_path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let pids: Vec<i32> = document["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        // Our daemon's worker (its pid comes from the daemon's own scoreboard).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
    }
    // Never below 2 on the way: a dead worker's counts are kept.
    expect_sample(metrics, "preforkd_worker_restarts_total", 2.0);
    eventually("2 new workers ready", || {
        let text = scrape(metrics);
        assert_eq!(sample(&text, accepted), Some(2.0), "{text}");
        let ready = text.lines().filter(|l| l.contains("state=\"ready\"} 1")).count();
        ready == 2 && pids.iter().all(|pid| !is_running(*pid))
    });
    let mut stream = connect(echo);
    assert_eq!(exchange(&mut stream, b"hello", QUICK), Outcome::Echoed);
    expect_sample(metrics, accepted, 3.0);
}
