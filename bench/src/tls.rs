//! The TLS scenario: TLS 1.3 with an ECDSA P-256 certificate, echo behind each terminator:
//! preforkd (its echo service, and its relay in front of the tokio echo server), HAProxy
//! (`bind ... ssl crt`, `nbthread 2`), nginx's stream module (`listen ... ssl`, 2 workers)
//! and stunnel4, the last three in front of the tokio echo server. The client is rustls
//! (TLS 1.3 only, X25519 only: the group every peer's OpenSSL 3.0 prefers, so that all do
//! the same key exchange). The servers take turns each round.
//!
//! Measured: full handshakes/s (a connection, a full handshake, one 64 B exchange,
//! close_notify), resumed handshakes/s (the same with a session ticket), and 64 B and 16 KiB
//! request/response on 50 long connections; the server's CPU per handshake and per MB.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::load::{self, MAX_ITERATIONS, Report, pattern, run_loops, source_of};
use crate::servers::{Kind, PreforkdOptions, Server};
use crate::{Row, binaries, installed, ms};

/// Makes the ECDSA P-256 CA and server certificate in `dir` with the openssl command:
/// `ca.pem`, `chain.pem` (leaf then CA), `key.pem`, `combined.pem` (chain and key, HAProxy's).
fn certificates(dir: &Path) -> std::io::Result<()> {
    let run = |args: &[&str]| -> std::io::Result<()> {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("openssl {args:?} failed")))
        }
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=bench CA", "-days", "2"],
    ]
    .concat())?;
    run(&[
        &["req", "-new"][..],
        &ec,
        &["-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost"],
    ]
    .concat())?;
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=DNS:localhost\n")?;
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "7",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.pem",
    ])?;
    let (leaf, ca, key) = (
        std::fs::read(dir.join("leaf.pem"))?,
        std::fs::read(dir.join("ca.pem"))?,
        std::fs::read(dir.join("key.pem"))?,
    );
    std::fs::write(dir.join("chain.pem"), [&leaf[..], &ca].concat())?;
    std::fs::write(dir.join("combined.pem"), [&leaf[..], &ca, &key].concat())
}

/// The client configuration: TLS 1.3, X25519, the bench CA; resumption on or off.
fn client(dir: &Path, resume: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for certificate in
        rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).expect("ca.pem")
    {
        roots.add(certificate.expect("a CA certificate")).expect("a usable CA");
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

type Stream = StreamOwned<ClientConnection, std::net::TcpStream>;

fn connect(config: &Arc<ClientConfig>, client: usize, addr: SocketAddr) -> std::io::Result<Stream> {
    let tcp = load::connect_from(source_of(client), addr)?;
    let name = ServerName::try_from("localhost").expect("a name");
    let conn = ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    // The handshake completes with the first write's flush.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

fn exchange(stream: &mut Stream, message: &[u8], echoed: &mut [u8]) -> std::io::Result<bool> {
    stream.write_all(message)?;
    stream.flush()?;
    stream.read_exact(echoed)?;
    Ok(echoed == message)
}

/// Connections of one 64 B exchange each, `loops` at once; with `resume`, every connection
/// after a loop's first resumes from a ticket. Returns the report and how many resumed.
fn handshakes(
    addr: SocketAddr,
    dir: &Path,
    loops: usize,
    resume: bool,
    duration: Duration,
) -> (Report, u64) {
    let resumed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = resumed.clone();
    let dir = dir.to_path_buf();
    let report = run_loops(loops, duration, move |client, stop| {
        let config = client_config(&dir, resume);
        let message = pattern(64, client as u64);
        let mut echoed = vec![0u8; 64];
        let mut report = Report::default();
        let mut iterations = 0;
        while !stop.load(Ordering::Relaxed) && iterations < MAX_ITERATIONS {
            iterations += 1;
            let started = Instant::now();
            let outcome = connect(&config, client, addr).and_then(|mut stream| {
                let same = exchange(&mut stream, &message, &mut echoed)?;
                if stream.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                stream.conn.send_close_notify();
                let _ = stream.flush();
                Ok(same)
            });
            match outcome {
                Ok(true) => {
                    report.operations += 1;
                    report.bytes += 64;
                    report
                        .latencies_us
                        .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                _ => report.errors += 1,
            }
        }
        report
    });
    (report, resumed.load(Ordering::Relaxed))
}

/// A loop's own client configuration (its own ticket store).
fn client_config(dir: &Path, resume: bool) -> Arc<ClientConfig> {
    client(dir, resume)
}

/// `loops` long connections of `size` B request/response.
fn long(addr: SocketAddr, dir: &Path, loops: usize, size: usize, duration: Duration) -> Report {
    let config = client(dir, false);
    run_loops(loops, duration, move |client, stop| {
        let message = pattern(size, client as u64);
        let mut echoed = vec![0u8; size];
        let mut report = Report::default();
        let Ok(mut stream) = connect(&config, client, addr) else {
            report.errors += 1;
            return report;
        };
        let mut iterations = 0;
        while !stop.load(Ordering::Relaxed) && iterations < MAX_ITERATIONS {
            iterations += 1;
            let started = Instant::now();
            match exchange(&mut stream, &message, &mut echoed) {
                Ok(true) => {
                    report.operations += 1;
                    report.bytes += size as u64;
                    report
                        .latencies_us
                        .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                _ => {
                    report.errors += 1;
                    return report;
                }
            }
        }
        report
    })
}

fn terminators(only: Option<&str>) -> Vec<Kind> {
    let mut kinds = vec![Kind::PreforkdTls, Kind::PreforkdTlsRelay];
    for (kind, program) in
        [(Kind::HaproxyTls, "haproxy"), (Kind::NginxTls, "nginx"), (Kind::Stunnel, "stunnel4")]
    {
        if installed(program)
            || Path::new(&format!("/usr/sbin/{program}")).is_file()
            || Path::new(&format!("/usr/bin/{program}")).is_file()
        {
            kinds.push(kind);
        } else {
            eprintln!("note: {program} is not installed; skipped");
        }
    }
    match only {
        None => kinds,
        Some(list) => kinds
            .into_iter()
            .filter(|k| list.split(',').any(|p| k.label().starts_with(p)))
            .collect(),
    }
}

/// Runs the TLS scenarios and prints their tables.
pub fn run(
    duration: Duration,
    loops: usize,
    only: Option<&str>,
    rounds: usize,
    scenarios: Option<&str>,
) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => return eprintln!("tls: {error}"),
    };
    if let Err(error) = certificates(dir.path()) {
        return eprintln!("tls: certificates: {error}");
    }
    let binaries = binaries();
    let none = PreforkdOptions { workers: 1, per_client: 0, backend: None, tls: None, log: None };
    let backend = match Server::start(Kind::Tokio, &binaries, &none) {
        Ok(server) => server,
        Err(error) => return eprintln!("tokio backend: {error}"),
    };
    let options = PreforkdOptions {
        workers: 2,
        per_client: 0,
        backend: Some(backend.addr),
        tls: Some(dir.path().to_path_buf()),
        log: None,
    };
    let kinds = terminators(only);
    println!("## TLS termination: TLS 1.3, ECDSA P-256, X25519\n");
    println!(
        "{} s per run, {rounds} rounds with the servers taking turns (median round shown); 2 workers \
         or threads each (HAProxy `nbthread 2`, nginx `worker_processes 2`, stunnel4 a thread per \
         connection); HAProxy, nginx, stunnel4 and preforkd's relay in front of the tokio echo \
         server, preforkd's echo in-process; client: rustls, {loops} loops for the handshakes, 50 \
         connections for request/response; all on 127.0.0.1. CPU: the server's own CPU time (not \
         the backend's, not the client's).",
        duration.as_secs()
    );
    type Measure<'a> = &'a dyn Fn(SocketAddr) -> (Report, u64);
    let full = |addr| handshakes(addr, dir.path(), loops, false, duration);
    let resumed = |addr| handshakes(addr, dir.path(), loops, true, duration);
    let small = |addr| (long(addr, dir.path(), 50, 64, duration), 0);
    let large = |addr| (long(addr, dir.path(), 50, 16 * 1024, duration), 0);
    let all: [(&str, &str, &str, Measure<'_>); 4] = [
        ("full", "full handshakes", "handshakes/s", &full),
        ("resumed", "resumed handshakes", "handshakes/s", &resumed),
        ("small", "64 B request/response, 50 connections", "msg/s", &small),
        ("large", "16 KiB request/response, 50 connections", "msg/s", &large),
    ];
    let wanted = |name: &str| scenarios.is_none_or(|list| list.split(',').any(|s| s == name));
    for (_, title, unit, scenario) in all.into_iter().filter(|(name, ..)| wanted(name)) {
        eprintln!("tls: {title}");
        let mut runs: Vec<Vec<(Row, u64)>> = kinds.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (index, &kind) in kinds.iter().enumerate() {
                let server = match Server::start(kind, &binaries, &options) {
                    Ok(server) => server,
                    Err(error) => {
                        eprintln!("{}: {error}", kind.label());
                        continue;
                    }
                };
                let before = server.cpu_ticks();
                let (report, resumed) = scenario(server.addr);
                let used =
                    server.cpu_ticks().saturating_sub(before) as f64 / crate::ticks_per_second();
                server.stop();
                let cores = used / report.elapsed.as_secs_f64().max(1e-9);
                eprintln!(
                    "  {:<24} {:>10.0}/s  {} errors",
                    kind.label(),
                    report.rate(),
                    report.errors
                );
                runs[index].push((Row { kind, report, cores, extra: String::new() }, resumed));
            }
        }
        println!("\n### {title}\n");
        println!(
            "| server | {unit} | MB/s | p50 ms | p99 ms | errors | CPU cores | CPU per op, us | CPU per MB, ms | resumed |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for mut taken in runs {
            taken.sort_by(|a, b| a.0.report.rate().total_cmp(&b.0.report.rate()));
            let middle = taken.len() / 2;
            if taken.is_empty() {
                continue;
            }
            let (row, resumed) = taken.swap_remove(middle);
            let r = &row.report;
            let seconds = r.elapsed.as_secs_f64();
            let cpu = row.cores * seconds;
            let mb = r.bytes as f64 / 1e6;
            println!(
                "| {} | {:.0} | {:.1} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {resumed} |",
                row.kind.label(),
                r.rate(),
                mb / seconds,
                ms(r.percentile(0.5)),
                ms(r.percentile(0.99)),
                r.errors,
                row.cores,
                cpu / (r.operations.max(1) as f64) * 1e6,
                cpu / mb.max(1e-9) * 1e3,
            );
        }
    }
    backend.stop();
}
