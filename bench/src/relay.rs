//! The relay scenario: preforkd's relay, HAProxy (`mode tcp`) and nginx's stream module, each
//! with 2 workers or threads, in front of the same tokio echo backend, plus the direct path
//! (client to backend) as the ceiling. preforkd runs twice, once per pump (`splice = true`,
//! `splice = false`). The servers take turns each round.

use std::time::Duration;

use crate::load::{self, Report};
use crate::servers::{Kind, PreforkdOptions, Server};
use crate::{Row, binaries, installed, ms};

/// One scenario's median rows, by proxy (`None`: the direct path).
type Rows = Vec<(Option<Kind>, Row)>;

const SPLICE: Kind = Kind::PreforkdRelay { splice: true };
const READ_WRITE: Kind = Kind::PreforkdRelay { splice: false };

/// The proxies measured, in order; `None` is the direct path.
fn proxies(only: Option<&str>) -> Vec<Option<Kind>> {
    let mut kinds = crate::servers::with_before(vec![
        SPLICE,
        READ_WRITE,
        Kind::PreforkdRelayChecked,
        Kind::PreforkdRelayUnix,
    ]);
    for (kind, program) in [(Kind::Haproxy, "haproxy"), (Kind::NginxStream, "nginx")] {
        if installed(program) || std::path::Path::new(&format!("/usr/sbin/{program}")).is_file() {
            kinds.push(kind);
        } else {
            eprintln!("note: {program} is not installed; skipped");
        }
    }
    let kinds = std::iter::once(None).chain(kinds.into_iter().map(Some));
    match only {
        None => kinds.collect(),
        Some(list) => kinds
            .filter(|k| k.is_none() || list.split(',').any(|p| k.unwrap().label().starts_with(p)))
            .collect(),
    }
}

fn label(kind: Option<Kind>) -> String {
    kind.map_or_else(|| "direct (no proxy)".into(), Kind::label)
}

/// Runs the relay scenarios and prints their tables.
pub fn run(duration: Duration, short_clients: usize, only: Option<&str>, rounds: usize) {
    let binaries = binaries();
    let none = PreforkdOptions { workers: 1, per_client: 0, backend: None, tls: None, log: None };
    let backend = match Server::start(Kind::Tokio, &binaries, &none) {
        Ok(server) => server,
        Err(error) => return eprintln!("tokio backend: {error}"),
    };
    // The same echo server on a Unix socket, for the relay's Unix backend.
    let unix = crate::servers::unix_backend(backend.addr.port());
    let unix_backend = std::process::Command::new(&binaries.tokio)
        .arg(format!("unix:{}", unix.display()))
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut unix_backend = match unix_backend {
        Ok(child) => child,
        Err(error) => return eprintln!("tokio backend on {}: {error}", unix.display()),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&unix).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let options = PreforkdOptions {
        workers: 2,
        per_client: 0,
        backend: Some(backend.addr),
        tls: None,
        log: None,
    };
    let kinds = proxies(only);
    println!("## Relay: proxies in front of the tokio echo server\n");
    println!(
        "{} s per run, {rounds} rounds with the proxies taking turns (median round shown); \
         backend: the tokio echo server; proxies with 2 workers (HAProxy `nbthread 2`, nginx \
         `worker_processes 2`); all on 127.0.0.1. CPU: the proxy's own CPU time (not the \
         backend's, not the load generator's) per operation.",
        duration.as_secs()
    );
    type Scenario = (&'static str, &'static str, usize, usize);
    let scenarios: [Scenario; 3] = [
        ("short", "conn/s", short_clients, 64),
        ("long", "msg/s", 50, 64),
        ("long", "msg/s", 50, 16 * 1024),
    ];
    let mut summary = Vec::new();
    for (name, unit, clients, size) in scenarios {
        eprintln!("relay {name}: {clients} clients, {size} B");
        let mut rows: Vec<(Option<Kind>, Row)> = Vec::new();
        let mut runs: Vec<Vec<Row>> = kinds.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (index, &kind) in kinds.iter().enumerate() {
                let scenario = |addr| match name {
                    "short" => load::short(addr, clients, size, duration),
                    _ => load::long(addr, clients, size, duration),
                };
                let row = match kind {
                    None => {
                        let report = scenario(backend.addr);
                        Some(Row { kind: Kind::Tokio, report, cores: 0.0, extra: String::new() })
                    }
                    Some(kind) => measure_proxy(kind, &options, scenario),
                };
                if let Some(row) = row {
                    eprintln!("  {:<24} {:>10.0}/s", label(kind), row.report.rate());
                    runs[index].push(row);
                }
            }
        }
        for (kind, mut taken) in kinds.iter().zip(runs) {
            taken.sort_by(|a, b| a.report.rate().total_cmp(&b.report.rate()));
            let middle = taken.len() / 2;
            if !taken.is_empty() {
                rows.push((*kind, taken.swap_remove(middle)));
            }
        }
        print_table(name, unit, clients, size, &rows);
        summary.push((format!("{name} {size} B"), rows));
    }
    print_summary(&summary);
    backend.stop();
    let _ = unix_backend.kill();
    let _ = unix_backend.wait();
    let _ = std::fs::remove_file(&unix);
}

fn measure_proxy(
    kind: Kind,
    options: &PreforkdOptions,
    scenario: impl FnOnce(std::net::SocketAddr) -> Report,
) -> Option<Row> {
    let server = match Server::start(kind, &binaries(), options) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("{}: {error}", kind.label());
            return None;
        }
    };
    let before = server.cpu_ticks();
    let report = scenario(server.addr);
    let used = server.cpu_ticks().saturating_sub(before) as f64 / crate::ticks_per_second();
    server.stop();
    let cores = used / report.elapsed.as_secs_f64().max(1e-9);
    Some(Row { kind, report, cores, extra: String::new() })
}

fn cpu_per_op(row: &Row) -> f64 {
    let ops = row.report.rate();
    if ops > 0.0 { row.cores / ops * 1e6 } else { 0.0 }
}

fn find(rows: &[(Option<Kind>, Row)], kind: Option<Kind>) -> Option<&Row> {
    rows.iter().find(|(k, _)| *k == kind).map(|(_, row)| row).filter(|row| row.report.rate() > 0.0)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn print_table(name: &str, unit: &str, clients: usize, size: usize, rows: &[(Option<Kind>, Row)]) {
    let rate = |kind| find(rows, kind).map(|row| row.report.rate());
    let direct = rate(None);
    let haproxy_cpu = find(rows, Some(Kind::Haproxy)).map(cpu_per_op).filter(|c| *c > 0.0);
    println!("\n### relay {name}: {clients} clients, {size} B request/response\n");
    println!(
        "| path | {unit} | MB/s | vs direct | splice vs this | read/write vs this | p50 ms | p99 ms | errors | proxy CPU cores | proxy CPU us/op | CPU vs HAProxy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (kind, row) in rows {
        let r = &row.report;
        let mb = r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6;
        let this = Some(r.rate()).filter(|_| kind.is_some());
        let (cores, per_op, vs_haproxy) = if kind.is_some() {
            let per_op = cpu_per_op(row);
            (format!("{:.2}", row.cores), format!("{per_op:.1}"), ratio(Some(per_op), haproxy_cpu))
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        println!(
            "| {} | {:.0} | {mb:.1} | {} | {} | {} | {} | {} | {} | {cores} | {per_op} | {vs_haproxy} |",
            label(*kind),
            r.rate(),
            ratio(Some(r.rate()), direct),
            ratio(rate(Some(SPLICE)), this),
            ratio(rate(Some(READ_WRITE)), this),
            ms(r.percentile(0.5)),
            ms(r.percentile(0.99)),
            r.errors,
        );
    }
}

/// The ratios the targets of issue #10 are stated in, for both pumps, from this run.
fn print_summary(scenarios: &[(String, Rows)]) {
    println!("\n### relay: ratios (preforkd / peer, same run)\n");
    println!(
        "| scenario | pump | vs HAProxy | vs nginx | vs direct | CPU/op vs HAProxy | CPU/op vs nginx |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, rows) in scenarios {
        let rate = |kind| find(rows, kind).map(|row| row.report.rate());
        let cpu = |kind| find(rows, kind).map(cpu_per_op);
        for pump in [SPLICE, READ_WRITE, Kind::PreforkdRelayChecked, Kind::PreforkdRelayUnix] {
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} |",
                label(Some(pump)),
                ratio(rate(Some(pump)), rate(Some(Kind::Haproxy))),
                ratio(rate(Some(pump)), rate(Some(Kind::NginxStream))),
                ratio(rate(Some(pump)), rate(None)),
                ratio(cpu(Some(pump)), cpu(Some(Kind::Haproxy))),
                ratio(cpu(Some(pump)), cpu(Some(Kind::NginxStream))),
            );
        }
    }
}
