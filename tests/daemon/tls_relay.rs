//! The relay's TLS (issue 23, part 2) with real servers and clients: TLS to backends
//! (`openssl s_server`: verified, a wrong name or an untrusted CA refused, mTLS), routing by
//! the ClientHello's server name (`openssl s_client`, a rustls client that sends its
//! ClientHello one byte at a time, garbage and oversized hellos), and TLS termination with
//! re-encryption. Certificates are made at test time by `tls.rs`'s [`Pki`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use preforkd::scoreboard::TlsFailure;

use crate::harness::{Daemon, Outcome, PATIENCE, closed_within, connect, expect_bytes, pid_of};
use crate::tls::{Pki, config, listener, s_client, wait_totals};

/// An `openssl s_server -rev` (it answers each line reversed) on a port of its own, with
/// `cert`'s certificate and key from `pki` and `extra` arguments; killed on drop.
struct Backend {
    child: Child,
    port: u16,
}

impl Backend {
    fn start(pki: &Pki, cert: &str, extra: &[&str]) -> Backend {
        let log: PathBuf = pki.dir().join(format!("s_server-{cert}-{}.log", extra.len()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0", "-rev", "-cert"])
            .arg(pki.path(&format!("{cert}.pem")))
            .arg("-key")
            .arg(pki.path(&format!("{cert}.key")))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("openssl s_server");
        let deadline = Instant::now() + PATIENCE;
        let port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let port = text.lines().find_map(|l| l.strip_prefix("ACCEPT 127.0.0.1:")?.parse().ok());
            if let Some(port) = port {
                break port;
            }
            assert!(Instant::now() < deadline, "s_server did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Backend { child, port }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay listener's `[listener.options]` with `backends` and the lines of `rest`.
fn relay(name: &str, backends: &[String], rest: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("{b:?}")).collect();
    listener(
        name,
        "relay",
        &format!("[listener.options]\nbackends = [{}]\nretries = 1\n{rest}", list.join(", ")),
    )
}

/// Sends `line` through the relay at `port` and expects it back reversed (from s_server).
fn reversed(port: u16, line: &str) -> Outcome {
    let mut client = connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    let expected: String = line.trim_end().chars().rev().collect();
    client.write_all(line.as_bytes()).unwrap();
    expect_bytes(&mut client, format!("{expected}\n").as_bytes(), PATIENCE)
}

#[test]
fn a_tls_backend_is_verified_resumed_and_drained_on_reload() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "server", &[]);
    let tls =
        format!("backend_tls = {{ server_name = \"localhost\", ca = {:?} }}\n", pki.path("ca.pem"));
    let daemon = Daemon::start(&config(1, &relay("to-tls", &[backend.address()], &tls)));
    let port = daemon.addr().port();
    assert_eq!(reversed(port, "hello\n"), Outcome::Echoed);
    let first = daemon.wait_for_log("the first access line", |l| {
        l.contains("access ") && l.contains("backend_tls=")
    });
    assert!(first.contains(" backend_tls=1.3 backend_resumed=0"), "{first}");
    // The worker's session cache: the next connection resumes.
    assert_eq!(reversed(port, "again\n"), Outcome::Echoed);
    daemon.wait_for_log("a resumed backend session", |l| l.contains("backend_resumed=1"));

    // An open relay with TLS to its backend is drained by a reload, never handed off: the
    // old worker serves it to its end.
    let old = daemon.worker_pids();
    let mut open = connect(daemon.addr());
    assert_eq!(exchange_reversed(&mut open, "before\n"), Outcome::Echoed);
    let (status, _, err) = daemon.control("reload");
    assert!(status.success(), "{err}");
    daemon.wait_generation(2);
    assert_eq!(exchange_reversed(&mut open, "after the reload\n"), Outcome::Echoed);
    drop(open);
    let lines = daemon.wait_for_lines("the drained connection's access line", 3, |l| {
        l.contains("access ") && l.contains("backend_tls=")
    });
    assert!(old.contains(&pid_of(&lines[2])), "served by the old worker {old:?}: {}", lines[2]);
}

/// Sends `line` on `stream`, expects it back reversed.
fn exchange_reversed(stream: &mut TcpStream, line: &str) -> Outcome {
    let expected: String = line.trim_end().chars().rev().collect();
    stream.write_all(line.as_bytes()).unwrap();
    expect_bytes(stream, format!("{expected}\n").as_bytes(), PATIENCE)
}

#[test]
fn a_backend_with_a_wrong_name_or_an_untrusted_ca_is_refused_and_logged_in_summary() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "server", &[]);
    let ca = pki.path("ca.pem");
    let listeners = format!(
        "{}{}",
        relay(
            "wrong-name",
            &[backend.address()],
            &format!("backend_tls = {{ server_name = \"b.example.org\", ca = {ca:?} }}\n")
        ),
        relay(
            "untrusted",
            &[backend.address()],
            &format!(
                "backend_tls = {{ server_name = \"localhost\", ca = {:?} }}\n",
                pki.path("rogue.pem")
            )
        ),
    );
    let daemon = Daemon::start(&config(1, &listeners));
    let tries = 4;
    for port in [daemon.addrs[0].port(), daemon.addrs[1].port()] {
        for _ in 0..tries {
            let mut client = connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
            client.write_all(b"secret\n").unwrap();
            assert!(closed_within(&mut client, PATIENCE), "refused: closed without an answer");
        }
    }
    let unavailable = daemon.wait_for_lines("the access lines", 2 * tries, |l| {
        l.contains("access ") && l.contains("reason=backend-unavailable")
    });
    assert!(unavailable.iter().all(|l| l.contains("backend=- tries=")), "{unavailable:?}");
    daemon.wait_for_log("the wrong name", |l| {
        l.contains("relay: TLS with backend 127.0.0.1:")
            && l.contains("certificate not valid for name \"b.example.org\"")
    });
    daemon.wait_for_log("the untrusted CA", |l| {
        l.contains("relay: TLS with backend 127.0.0.1:") && l.contains("UnknownIssuer")
    });
    // 2 x 4 clients, 2 connects each: 16 failures, logged in a line or two.
    let lines = daemon.matching(|l| l.contains("relay: TLS with backend"));
    assert!(lines.len() < 2 * tries, "a line per failure: {lines:?}");
    // The ones held back are reported at the end of the interval, without a failure more.
    let report = daemon.wait_for_log("the held-back failures", |l| {
        l.contains("relay: TLS with this relay's backends failed") && l.contains("more time(s)")
    });
    assert!(report.contains("(the last: backend 127.0.0.1:"), "{report}");
    daemon.wait_for_log("passive health", |l| {
        l.contains("relay backend 127.0.0.1:") && l.contains("is down")
    });
}

#[test]
fn backend_mtls_serves_with_the_client_certificate_and_fails_without() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let backend = Backend::start(&pki, "server", &["-Verify", "1", "-CAfile", &ca]);
    let with = format!(
        "backend_tls = {{ server_name = \"localhost\", ca = {ca:?}, certificate = {:?}, key = {:?} }}\n",
        pki.path("alice.pem"),
        pki.path("alice.key")
    );
    let without = format!("backend_tls = {{ server_name = \"localhost\", ca = {ca:?} }}\n");
    let listeners = format!(
        "{}{}",
        relay("with", &[backend.address()], &with),
        relay("without", &[backend.address()], &without)
    );
    let daemon = Daemon::start(&config(1, &listeners));
    assert_eq!(reversed(daemon.addrs[0].port(), "mutual\n"), Outcome::Echoed);
    // TLS 1.3: the backend refuses after our side of the handshake is done, with an alert.
    let mut client = connect(daemon.addrs[1]);
    client.write_all(b"mutual\n").unwrap();
    assert!(closed_within(&mut client, PATIENCE), "no certificate: nothing relayed");
    daemon.wait_for_log("the backend's refusal", |l| {
        l.contains("relay: TLS with backend") && l.contains("CertificateRequired")
    });
}

#[test]
fn a_tls_1_3_backend_refusing_our_certificate_is_a_failed_connect_and_the_next_one_serves() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    // It asks for a client certificate and refuses us, who have none, with an alert that
    // comes after our side of the TLS 1.3 handshake is complete.
    let refusing = Backend::start(&pki, "server", &["-Verify", "1", "-CAfile", &ca]);
    let serving = Backend::start(&pki, "server", &[]);
    let options = format!(
        "balance = \"first\"\nbackend_tls = {{ server_name = \"localhost\", ca = {ca:?} }}\n"
    );
    let backends = [refusing.address(), serving.address()];
    let daemon = Daemon::start(&config(1, &relay("first", &backends, &options)));
    // The client says nothing until the relay is connected: the refusal comes while the
    // relay waits for the backend's verdict, and the next backend serves it.
    let mut client = connect(daemon.addr());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let rows = backend_rows(&daemon);
        let row = |address: &str| rows.iter().find(|r| r["address"] == address).cloned();
        let (refused, served) = (row(&refusing.address()), row(&serving.address()));
        if let (Some(refused), Some(served)) = (&refused, &served)
            && refused["failures"] == 1
            && served["active"] == 1
        {
            assert_eq!(refused["connects"], 0, "a refusal is no successful connect: {rows:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the relay never reached the second backend: {rows:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(exchange_reversed(&mut client, "after a refusal\n"), Outcome::Echoed);
    drop(client);
    let line = daemon.wait_for_log("the access line", |l| l.contains("access "));
    let served = format!("backend={} ", serving.address());
    assert!(line.contains(&served) && line.contains("tries=2"), "{line}");
    daemon.wait_for_log("the backend's refusal", |l| {
        l.contains("relay: TLS with backend") && l.contains("CertificateRequired")
    });
}

/// The backend rows of `status --json`.
fn backend_rows(daemon: &Daemon) -> Vec<serde_json::Value> {
    let config = daemon.config_path.to_str().unwrap();
    let (status, json, stderr) = crate::harness::run_cli(&["status", "--json", "-c", config]);
    assert!(status.success(), "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&json).unwrap();
    document["backends"].as_array().cloned().unwrap_or_default()
}

/// A rustls client configuration that trusts `pki`'s CA.
fn rustls_client(pki: &Pki) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

#[test]
fn server_names_route_to_their_backends_without_decrypting() {
    let pki = Pki::new();
    let b = Backend::start(&pki, "b", &[]);
    let wild = Backend::start(&pki, "wild", &[]);
    let routes = format!(
        "[[listener.options.route]]\nserver_names = [\"b.example.org\"]\nbackends = [{:?}]\n\
         [[listener.options.route]]\nserver_names = [\"*.w.example.org\"]\nbackends = [{:?}]\n",
        b.address(),
        wild.address()
    );
    // No default: unknown names and clients without one are refused.
    let sni = listener("sni", "relay", &format!("[listener.options]\n{routes}"));
    let daemon = Daemon::start(&config(2, &sni));
    let port = daemon.addr().port();
    let ca = pki.path("ca.pem");
    let subject = |args: &[&str]| {
        let args = [&["-CAfile", ca.as_str()][..], args].concat();
        let (_, out) = s_client(port, &args, b"");
        out.lines().find(|l| l.starts_with("subject=")).unwrap_or("").replace(' ', "")
    };
    assert_eq!(subject(&["-servername", "b.example.org"]), "subject=CN=b.example.org");
    assert_eq!(subject(&["-servername", "X.W.Example.org"]), "subject=CN=wild");
    assert_eq!(subject(&["-servername", "unknown.example.org"]), "");
    assert_eq!(subject(&["-noservername"]), "");
    wait_totals(&daemon, "sni", |t| t.tls_failed(TlsFailure::UnknownName) == 2);
    daemon.wait_for_log("the summary", |l| {
        l.contains("TLS handshake failed with 127.0.0.1 on sni (unknown-name)")
    });
    let line = daemon.wait_for_log("an access line", |l| {
        l.contains("access ") && l.contains(" sni=b.example.org ")
    });
    assert!(line.contains(&format!("backend={}", b.address())), "{line}");

    // A ClientHello written one byte at a time (TCP_NODELAY: one segment each), then the
    // handshake and a line through the relay, by a rustls client that verifies the name.
    let name = rustls::pki_types::ServerName::try_from("a.w.example.org").unwrap();
    let mut conn = rustls::ClientConnection::new(rustls_client(&pki), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert!(hello.len() > 1000, "a post-quantum key share: {} bytes", hello.len());
    let mut socket = connect(daemon.addr());
    socket.set_nodelay(true).unwrap();
    for byte in &hello {
        socket.write_all(std::slice::from_ref(byte)).unwrap();
    }
    let mut stream = rustls::Stream::new(&mut conn, &mut socket);
    stream.write_all(b"dribbled\n").unwrap();
    let mut answer = [0u8; 9];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"delbbird\n");
    drop(socket);

    // Plain text, and ClientHellos announced larger than 16 KiB: closed.
    let garbage = |bytes: &[u8]| {
        let mut client = connect(daemon.addr());
        client.write_all(bytes).unwrap();
        assert!(closed_within(&mut client, PATIENCE), "{:?}", &bytes[..9]);
    };
    garbage(b"GET / HTTP/1.1\r\nHost: b.example.org\r\n\r\n");
    wait_totals(&daemon, "sni", |t| t.tls_failed(TlsFailure::NotTls) == 1);
    garbage(b"\x16\x03\x01\x40\x00\x01\xff\xff\xff");
    let mut large = b"\x16\x03\x01\x48\x00\x01\x00\x47\xfc".to_vec();
    large.resize(24 * 1024, 0x41);
    let mut client = connect(daemon.addr());
    // The relay closes once it knows: the rest of the write may fail.
    let _ = client.write_all(&large);
    assert!(closed_within(&mut client, PATIENCE), "a ClientHello of 18 KiB");
    wait_totals(&daemon, "sni", |t| t.tls_failed(TlsFailure::TooLarge) == 2);
    assert!(
        daemon.matching(|l| l.contains("access ") && l.contains("reason=tls-")).is_empty(),
        "refused hellos have no access line each"
    );
}

#[test]
fn a_client_hello_that_never_completes_is_closed_after_preread_timeout() {
    let pki = Pki::new();
    let b = Backend::start(&pki, "b", &[]);
    let options = format!(
        "[listener.options]\nbackends = [{:?}]\npreread_timeout = \"1s\"\n\
         [[listener.options.route]]\nserver_names = [\"b.example.org\"]\nbackends = [{:?}]\n",
        b.address(),
        b.address()
    );
    let daemon = Daemon::start(&config(1, &listener("sni", "relay", &options)));
    // A default route: a client without a name goes to `backends`.
    let (_, out) =
        s_client(daemon.addr().port(), &["-CAfile", &pki.path("ca.pem"), "-noservername"], b"");
    assert!(out.contains("subject=CN"), "{out}");
    let mut client = connect(daemon.addr());
    let started = Instant::now();
    client.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").unwrap();
    assert!(closed_within(&mut client, PATIENCE));
    assert!(started.elapsed() >= Duration::from_millis(900), "closed at the timeout, not before");
    wait_totals(&daemon, "sni", |t| t.tls_failed(TlsFailure::Timeout) == 1);
}

#[test]
fn tls_termination_in_front_of_a_tls_backend_re_encrypts() {
    let pki = Pki::new();
    let backend = Backend::start(&pki, "b", &[]);
    let options = format!(
        "[listener.options]\nbackends = [{:?}]\nbackend_tls = {{ server_name = \"b.example.org\", ca = {:?} }}\n{}",
        backend.address(),
        pki.path("ca.pem"),
        pki.table("")
    );
    let daemon = Daemon::start(&config(1, &listener("both", "relay", &options)));
    // rustls as the client: it verifies the relay's certificate, then the relay verifies
    // the backend's.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(rustls_client(&pki), name).unwrap();
    let mut socket = connect(daemon.addr());
    let mut stream = rustls::Stream::new(&mut conn, &mut socket);
    stream.write_all(b"both ways\n").unwrap();
    let mut answer = [0u8; 10];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"syaw htob\n");
    conn.send_close_notify();
    conn.complete_io(&mut socket).unwrap();
    drop(socket);
    let line = daemon
        .wait_for_log("the access line", |l| l.contains("access ") && l.contains("listener=both"));
    assert!(line.contains(" tls=1.3 ") && line.contains(" backend_tls=1.3 "), "{line}");
}

#[test]
fn check_reports_backend_tls_and_route_mistakes_with_their_keys() {
    let pki = Pki::new();
    let text = format!(
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nservice = \"relay\"\n[listener.options]\n\
         backends = [\"unix:/run/app.sock\"]\nbackend_tls = {{ ca = {:?} }}\n\
         [[listener]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nservice = \"relay\"\n[listener.options]\n\
         backends = [\"127.0.0.1:1\"]\nbackend_tls = {{ ca = \"missing.pem\", certificate = {:?} }}\n\
         [[listener.options.route]]\nserver_names = [\"not a name\", \"*.example.org\"]\nbackends = [\"127.0.0.1:2\"]\n",
        pki.path("ca.pem"),
        pki.path("alice.pem"),
    );
    let file = pki.dir().join("wrong.toml");
    std::fs::write(&file, text).unwrap();
    let (status, out, err) = crate::harness::run_cli(&["check", "-c", file.to_str().unwrap()]);
    let text = format!("{out}{err}");
    assert!(!status.success(), "{text}");
    for expected in [
        "listener[0].options.backend_tls.server_name: missing: backend unix:/run/app.sock has no host name",
        "listener[1].options.backend_tls.ca:",
        "missing.pem",
        "listener[1].options.backend_tls.key: missing: certificate needs its key",
        "listener[1].options.route[0].server_names: \"not a name\" is not a server name",
    ] {
        assert!(text.contains(expected), "{expected:?} not in {text}");
    }
    // The relative CA path is the configuration file's directory's.
    assert!(text.contains(&pki.dir().join("missing.pem").display().to_string()), "{text}");
}

/// A ClientHello for `name`, as rustls's client sends it.
fn client_hello(pki: &Pki, name: &str) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(rustls_client(pki), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

#[test]
fn each_route_takes_its_turns_among_its_own_backends() {
    let pki = Pki::new();
    // Four plain TCP backends that count what reaches them: the ClientHello, unchanged.
    let listeners: Vec<std::net::TcpListener> =
        (0..4).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addresses: Vec<String> =
        listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let options = format!(
        "[listener.options]\n\
         [[listener.options.route]]\nserver_names = [\"a.example.org\"]\nbackends = [{:?}, {:?}]\n\
         [[listener.options.route]]\nserver_names = [\"b.example.org\"]\nbackends = [{:?}, {:?}]\n",
        addresses[0], addresses[1], addresses[2], addresses[3]
    );
    let daemon = Daemon::start(&config(2, &listener("routes", "relay", &options)));
    let (a, b) = (client_hello(&pki, "a.example.org"), client_hello(&pki, "b.example.org"));
    let (tx, rx) = std::sync::mpsc::channel();
    for (index, listener) in listeners.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut first = [0u8; 5];
                if stream.read_exact(&mut first).is_ok() {
                    let _ = tx.send((index, first));
                }
            }
        });
    }
    // The two routes' clients alternate: each route must still alternate its own backends.
    let mut clients = Vec::new();
    for round in 0..8 {
        let mut client = connect(daemon.addr());
        client.write_all(if round % 2 == 0 { &a } else { &b }).unwrap();
        let (backend, first) = rx.recv_timeout(PATIENCE).expect("the hello reached a backend");
        assert_eq!(&first[..], &(if round % 2 == 0 { &a } else { &b })[..5], "unchanged");
        assert_eq!(backend / 2, round % 2, "route {}: backend {backend}", round % 2);
        clients.push((round, backend, client));
    }
    for route in 0..2 {
        let mut used: Vec<usize> =
            clients.iter().filter(|c| c.0 % 2 == route).map(|c| c.1).collect();
        used.sort_unstable();
        assert_eq!(used, [route * 2, route * 2, route * 2 + 1, route * 2 + 1], "route {route}");
    }
}
