//! TLS termination (issue 23) with real clients: `gnutls-cli`, `openssl s_client`, `curl`.
//! Certificates are made by the `openssl` command in a temporary directory for each test.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use preforkd::scoreboard::{self, ListenerTotals, Refusal, Scoreboard, TlsFailure};

use crate::harness::{Daemon, PATIENCE, random_bytes};

/// Runs `openssl` with `args` in `dir`; panics on failure.
pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test PKI: a CA, certificates signed by it, and a CA nobody trusts.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap() };
        for ca in ["ca", "rogue"] {
            let subject = format!("/CN=Test {ca}");
            openssl(
                pki.dir(),
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-subj",
                    &subject,
                    "-days",
                    "30",
                ],
            );
        }
        pki.issue("server", "ca", "/CN=localhost", &["localhost"], "1001");
        pki.issue("b", "ca", "/CN=b.example.org", &["b.example.org"], "1002");
        pki.issue("wild", "ca", "/CN=wild", &["*.w.example.org"], "1003");
        pki.issue("alice", "ca", "/O=Example/CN=alice", &[], "A11CE");
        pki.issue("mallory", "rogue", "/CN=mallory", &[], "0BAD");
        pki
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn path(&self, file: &str) -> String {
        self.dir().join(file).to_str().unwrap().to_owned()
    }

    /// `NAME.pem` and `NAME.key`, signed by `ca`, with serial `serial` (hex).
    pub(crate) fn issue(&self, name: &str, ca: &str, subject: &str, dns: &[&str], serial: &str) {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        openssl(
            self.dir(),
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        let ext = format!("{name}.ext");
        let names: Vec<String> = dns.iter().map(|d| format!("DNS:{d}")).collect();
        let text = if names.is_empty() {
            "extendedKeyUsage=clientAuth\n".to_owned()
        } else {
            format!("subjectAltName={}\n", names.join(","))
        };
        std::fs::write(self.dir().join(&ext), text).unwrap();
        openssl(
            self.dir(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-set_serial",
                &format!("0x{serial}"),
                "-days",
                "30",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// `[listener.tls]` with the server certificate, and `extra` lines.
    pub(crate) fn table(&self, extra: &str) -> String {
        format!(
            "[listener.tls]\ncertificate = {:?}\nkey = {:?}\n{extra}\n",
            self.path("server.pem"),
            self.path("server.key")
        )
    }
}

/// The listener totals of the daemon, by name.
pub(crate) fn totals(daemon: &Daemon, name: &str) -> ListenerTotals {
    let board = Scoreboard::open(&scoreboard::path_for(daemon.pid_file())).expect("scoreboard");
    board.listener_totals().into_iter().find(|t| t.name == name).expect("the listener")
}

/// Waits until the totals of listener `name` satisfy `condition`.
pub(crate) fn wait_totals(
    daemon: &Daemon,
    name: &str,
    condition: impl Fn(&ListenerTotals) -> bool,
) -> ListenerTotals {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = totals(daemon, name);
        if condition(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "listener {name}: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `openssl s_client` to `port` with `args`, stdin from `input`; (success, stdout+stderr).
pub(crate) fn s_client(port: u16, args: &[&str], input: &[u8]) -> (bool, String) {
    let connect = format!("127.0.0.1:{port}");
    let mut child = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &connect])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub(crate) fn config(workers: usize, listeners: &str) -> String {
    format!(
        "[daemon]\nworkers = {workers}\ngraceful_timeout = \"10s\"\nallow_root_workers = true\n\
         pid_file = \"@DIR@/preforkd.pid\"\n[log]\nlevel = \"debug\"\n{listeners}"
    )
}

pub(crate) fn listener(name: &str, service: &str, rest: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nservice = \"{service}\"\n{rest}\n"
    )
}

#[test]
fn echo_over_tls_1_2_and_1_3_is_byte_exact_and_ends_with_close_notify() {
    let pki = Pki::new();
    let daemon = Daemon::start(&config(2, &listener("echo", "echo", &pki.table(""))));
    let port = daemon.addr().port();
    let input = random_bytes(1 << 20, 23);
    for (version, priority) in
        [("1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2"), ("1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.3")]
    {
        // gnutls-cli sends close_notify at the end of its input and reads on: a half-close,
        // answered with the rest of the echo, then the server's close_notify.
        let log = pki.dir().join(format!("gnutls-{version}.log"));
        let mut child = Command::new("timeout")
            .args(["30", "gnutls-cli", "--x509cafile", &pki.path("ca.pem")])
            .arg(format!("--logfile={}", log.display()))
            .args(["--priority", priority, "-p", &port.to_string(), "localhost"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gnutls-cli");
        let mut stdin = child.stdin.take().unwrap();
        let sent = input.clone();
        let writer = std::thread::spawn(move || stdin.write_all(&sent));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "gnutls-cli TLS {version}: {:?}",
            std::fs::read_to_string(&log)
        );
        assert_eq!(out.stdout.len(), input.len(), "TLS {version}");
        assert!(out.stdout == input, "TLS {version}: the echo differs");
        let line = daemon.wait_for_log(&format!("the TLS {version} access line"), |l| {
            l.contains(&format!(" tls={version} ")) && l.contains("access ")
        });
        assert!(line.contains("reason=client-close"), "{line}");
        assert!(line.contains(" sni=localhost resumed=0"), "{line}");
    }
    let echo = wait_totals(&daemon, "echo", |t| t.tls_handshakes >= 2);
    assert_eq!(echo.tls_resumed, 0);
    assert_eq!(echo.tls_failed.iter().sum::<u64>(), 0, "{echo:?}");
}

#[test]
fn sni_picks_the_certificate_unknown_names_get_the_default_and_alpn_is_negotiated() {
    let pki = Pki::new();
    let sni = format!(
        "alpn = [\"h2\", \"http/1.1\"]\n[[listener.tls.sni]]\nname = \"b.example.org\"\ncertificate = {:?}\nkey = {:?}\n\
         [[listener.tls.sni]]\nname = \"*.w.example.org\"\ncertificate = {:?}\nkey = {:?}\n",
        pki.path("b.pem"),
        pki.path("b.key"),
        pki.path("wild.pem"),
        pki.path("wild.key")
    );
    let daemon = Daemon::start(&config(1, &listener("echo", "echo", &pki.table(&sni))));
    let port = daemon.addr().port();
    let subject = |name: Option<&str>| {
        let mut args = vec!["-CAfile".to_owned(), pki.path("ca.pem"), "-alpn".into(), "h2".into()];
        if let Some(name) = name {
            args.extend(["-servername".to_owned(), name.to_owned()]);
        } else {
            args.push("-noservername".to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, out) = s_client(port, &args, b"");
        let line = out.lines().find(|l| l.starts_with("subject=")).unwrap_or("").replace(' ', "");
        assert!(out.contains("ALPN protocol: h2"), "{out}");
        line
    };
    assert_eq!(subject(Some("b.example.org")), "subject=CN=b.example.org");
    assert_eq!(subject(Some("B.Example.Org")), "subject=CN=b.example.org", "names have no case");
    assert_eq!(subject(Some("x.w.example.org")), "subject=CN=wild");
    assert_eq!(subject(Some("unknown.example.org")), "subject=CN=localhost");
    assert_eq!(subject(None), "subject=CN=localhost");
    // A client that offers only another protocol is refused.
    let (ok, out) = s_client(port, &["-CAfile", &pki.path("ca.pem"), "-alpn", "smtp"], b"");
    assert!(!ok || out.contains("alert"), "{out}");
    wait_totals(&daemon, "echo", |t| t.tls_failed(TlsFailure::Incompatible) == 1);
}

#[test]
fn mtls_refuses_without_a_certificate_and_an_exec_child_sees_the_client() {
    let pki = Pki::new();
    let exec = "[listener.options]\nprogram = \"/usr/bin/env\"\n";
    let ca = format!("client_ca = {:?}\n", pki.path("ca.pem"));
    let listeners = format!(
        "{}{}",
        listener("required", "exec", &format!("{exec}{}", pki.table(&ca))),
        listener(
            "optional",
            "exec",
            &format!("{exec}{}", pki.table(&format!("{ca}client_auth = \"optional\"\n")))
        )
    );
    let daemon = Daemon::start(&config(1, &listeners));
    let (required, optional) = (daemon.addrs[0].port(), daemon.addrs[1].port());
    let ca_file = pki.path("ca.pem");
    let trust = ["-CAfile", &ca_file, "-quiet"];
    let (mallory_pem, mallory_key) = (pki.path("mallory.pem"), pki.path("mallory.key"));
    let (alice_pem, alice_key) = (pki.path("alice.pem"), pki.path("alice.key"));

    let (_, out) = s_client(required, &trust, b"");
    assert!(!out.contains("SSL_PROTOCOL="), "no certificate, no child: {out}");
    wait_totals(&daemon, "required", |t| t.tls_failed(TlsFailure::NoClientCertificate) == 1);
    let mallory = [&trust[..], &["-cert", &mallory_pem, "-key", &mallory_key]].concat();
    let (_, out) = s_client(required, &mallory, b"");
    assert!(!out.contains("SSL_PROTOCOL="), "an untrusted certificate: {out}");
    wait_totals(&daemon, "required", |t| t.tls_failed(TlsFailure::BadClientCertificate) == 1);
    daemon.wait_for_log("the failure summary", |l| {
        l.contains("TLS handshake failed with 127.0.0.1 on required (no-client-certificate)")
    });
    assert!(
        daemon.matching(|l| l.contains("access ") && l.contains("listener=required")).is_empty(),
        "a failed handshake has no access line"
    );

    let alice =
        [&trust[..], &["-cert", &alice_pem, "-key", &alice_key, "-servername", "localhost"]]
            .concat();
    let (_, out) = s_client(required, &alice, b"");
    for expected in [
        "SSL_PROTOCOL=TLSv1.3",
        "SSL_CLIENT_VERIFY=SUCCESS",
        "SSL_CLIENT_S_DN=CN=alice,O=Example",
        "SSL_CLIENT_I_DN=CN=Test ca",
        "SSL_CLIENT_M_SERIAL=0A11CE",
        "SSL_TLS_SNI=localhost",
        "SSL_CIPHER=TLS_",
        "PROTO=TCP",
    ] {
        assert!(out.lines().any(|l| l.starts_with(expected)), "{expected} not in {out}");
    }
    let (_, out) = s_client(optional, &trust, b"");
    assert!(out.contains("SSL_CLIENT_VERIFY=NONE"), "optional: {out}");
    assert!(!out.contains("SSL_CLIENT_S_DN"), "{out}");
    let line = daemon.wait_for_log("the child's access line", |l| {
        l.contains("access ") && l.contains("listener=optional")
    });
    assert!(line.contains(" tls=1.3 ") && line.contains("status=exit:0"), "{line}");
}

#[test]
fn a_ticket_resumes_on_another_worker() {
    let pki = Pki::new();
    let daemon = Daemon::start(&config(2, &listener("daytime", "daytime", &pki.table(""))));
    resumes_on_another_worker(&pki, &daemon, daemon.addr().port());
    let daytime = wait_totals(&daemon, "daytime", |t| t.tls_resumed >= 1);
    assert_eq!(daytime.tls_failed.iter().sum::<u64>(), 0, "{daytime:?}");
}

#[test]
fn a_ticket_resumes_on_another_worker_past_the_64th_listener() {
    let pki = Pki::new();
    // Listener ids 0 to 63 are plain; the TLS one is id 64, past the scoreboard's per-listener
    // rows: its ticket keys are shared all the same.
    let fillers: String = (0..64).map(|i| listener(&format!("filler{i}"), "discard", "")).collect();
    let tls = listener("daytime", "daytime", &pki.table(""));
    let daemon = Daemon::start(&config(2, &format!("{fillers}{tls}")));
    // Its address is not in the status (no row): the master's one socket not listed there.
    let listed = &daemon.addrs;
    assert_eq!(listed.len(), 64, "{listed:?}");
    let bound = crate::harness::listening_addrs(daemon.pid().as_raw());
    let unlisted: Vec<_> = bound.iter().filter(|a| !listed.contains(a)).collect();
    assert_eq!(unlisted.len(), 1, "{bound:?}");
    resumes_on_another_worker(&pki, &daemon, unlisted[0].port());
}

/// Gets a ticket from the TLS listener at `port` and resumes with it until a worker other
/// than the issuer does; panics if none does in 60 tries.
fn resumes_on_another_worker(pki: &Pki, daemon: &Daemon, port: u16) {
    let session = pki.path("session.pem");
    let ca_file = pki.path("ca.pem");
    let trust = ["-CAfile", &ca_file, "-quiet"];
    let (_, first) = s_client(port, &[&trust[..], &["-sess_out", &session]].concat(), b"");
    assert!(first.contains("20"), "the daytime answer: {first}");
    let issued = daemon.wait_for_log("the first access line", |l| l.contains("resumed=0"));
    let issuer = crate::harness::pid_of(&issued);
    let mut elsewhere = false;
    for _ in 0..60 {
        s_client(port, &[&trust[..], &["-sess_in", &session]].concat(), b"");
        let resumed = daemon.matching(|l| l.contains("access ") && l.contains("resumed=1"));
        if resumed.iter().any(|l| crate::harness::pid_of(l) != issuer) {
            elsewhere = true;
            break;
        }
    }
    assert!(
        elsewhere,
        "no resumption on the other worker: {:?}",
        daemon.matching(|l| l.contains("access "))
    );
}

/// The serial of the certificate a new connection to `port` gets.
fn served_serial(pki: &Pki, port: u16) -> String {
    let (_, out) =
        s_client(port, &["-CAfile", &pki.path("ca.pem"), "-servername", "localhost"], b"");
    let pem = pki.dir().join("served.pem");
    std::fs::write(&pem, &out).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_reload_serves_the_new_certificate_while_old_sessions_go_on_and_a_bad_key_is_refused() {
    let pki = Pki::new();
    let daemon = Daemon::start(&config(1, &listener("echo", "echo", &pki.table(""))));
    let port = daemon.addr().port();
    assert_eq!(served_serial(&pki, port), "serial=1001");
    // An open session that keeps exchanging through the reload.
    let connect = format!("127.0.0.1:{port}");
    let mut client = Command::new("timeout")
        .args([
            "60",
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            &connect,
            "-CAfile",
            &pki.path("ca.pem"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut to = client.stdin.take().unwrap();
    let mut from = BufReader::new(client.stdout.take().unwrap());
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let exchanger = std::thread::spawn(move || {
        let mut exchanged = 0;
        let mut line = String::new();
        loop {
            let message = format!("line {exchanged}\n");
            if to.write_all(message.as_bytes()).is_err() {
                return Err(format!("write failed after {exchanged}"));
            }
            line.clear();
            if from.read_line(&mut line).is_err() || line != message {
                return Err(format!("after {exchanged}: got {line:?}"));
            }
            exchanged += 1;
            if stop_rx.recv_timeout(Duration::from_millis(20)).is_ok() {
                return Ok(exchanged);
            }
        }
    });
    // New files, then a reload.
    pki.issue("server", "ca", "/CN=localhost", &["localhost"], "2002");
    let (status, _, err) = daemon.control("reload");
    assert!(status.success(), "{err}");
    daemon.wait_generation(2);
    assert_eq!(served_serial(&pki, port), "serial=2002");
    // A key that does not match: the reload is refused, the serving certificate stays.
    std::fs::copy(pki.dir().join("b.key"), pki.dir().join("server.key")).unwrap();
    let (status, out, err) = daemon.control("reload");
    assert!(!status.success(), "{out}{err}");
    assert!(format!("{out}{err}").contains("does not match the certificate"), "{out}{err}");
    assert_eq!(served_serial(&pki, port), "serial=2002");
    stop_tx.send(()).unwrap();
    let exchanged = exchanger.join().unwrap().expect("the old session kept exchanging");
    assert!(exchanged > 0);
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn a_handshake_flood_is_refused_by_the_rate_before_any_crypto() {
    let pki = Pki::new();
    let policy = format!("max_connection_rate_per_client = \"3/m\"\n{}", pki.table(""));
    let daemon = Daemon::start(&config(2, &listener("echo", "echo", &policy)));
    let port = daemon.addr().port();
    for _ in 0..15 {
        s_client(port, &["-CAfile", &pki.path("ca.pem")], b"");
    }
    let echo = wait_totals(&daemon, "echo", |t| t.refused(Refusal::Rate) == 12);
    assert_eq!(echo.accepted, 3, "only the rate's connections started a handshake: {echo:?}");
    assert_eq!(echo.tls_handshakes + echo.tls_failed.iter().sum::<u64>(), 3, "{echo:?}");
}

#[test]
fn metrics_over_tls_with_curl_and_plain_text_is_counted_as_not_tls() {
    let pki = Pki::new();
    let daemon = Daemon::start(&config(1, &listener("metrics", "metrics", &pki.table(""))));
    let port = daemon.addr().port();
    let url = format!("https://localhost:{port}/metrics");
    let curl = || {
        let out = Command::new("timeout")
            .args(["10", "curl", "-sS", "--cacert", &pki.path("ca.pem")])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1"), &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = curl();
    assert!(first.contains("preforkd_listener_accepted"), "{first}");
    // The first handshake is on the scoreboard once the worker has published it.
    wait_totals(&daemon, "metrics", |t| t.tls_handshakes == 1);
    let body = curl();
    assert!(
        body.contains(
            "preforkd_listener_tls_handshakes_total{listener=\"metrics\",kind=\"full\"} "
        ),
        "{body}"
    );
    let mut plain = crate::harness::connect(daemon.addr());
    plain.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // An alert, then the close.
    plain.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert_eq!(answer.first(), Some(&21), "a TLS alert record: {answer:?}");
    wait_totals(&daemon, "metrics", |t| t.tls_failed(TlsFailure::NotTls) == 1);
}

#[test]
fn check_reports_certificate_problems_with_the_key_that_names_the_file() {
    let pki = Pki::new();
    let wrong = pki.dir().join("wrong.toml");
    // A key of another certificate, a chain out of order, an SNI name not covered.
    let chain = pki.dir().join("reversed.pem");
    let (server, ca) = (
        std::fs::read(pki.dir().join("server.pem")).unwrap(),
        std::fs::read(pki.dir().join("ca.pem")).unwrap(),
    );
    std::fs::write(&chain, [ca, server].concat()).unwrap();
    let text = format!(
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n[listener.tls]\ncertificate = {:?}\nkey = {:?}\n\
         [[listener.tls.sni]]\nname = \"c.example.org\"\ncertificate = {:?}\nkey = {:?}\n\
         [[listener]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n[listener.tls]\ncertificate = {:?}\nkey = {:?}\n",
        pki.path("server.pem"),
        pki.path("b.key"),
        pki.path("b.pem"),
        pki.path("b.key"),
        chain.to_str().unwrap(),
        pki.path("server.key"),
    );
    std::fs::write(&wrong, text).unwrap();
    let wrong: PathBuf = wrong;
    let (status, out, err) = crate::harness::run_cli(&["check", "-c", wrong.to_str().unwrap()]);
    let text = format!("{out}{err}");
    assert!(!status.success(), "{text}");
    assert!(text.contains("listener[0].tls.key:") && text.contains("does not match"), "{text}");
    assert!(
        text.contains("listener[0].tls.sni[0].certificate:")
            && text.contains("does not cover \"c.example.org\""),
        "{text}"
    );
    assert!(
        text.contains("listener[1].tls.certificate:") && text.contains("out of order"),
        "{text}"
    );
}
