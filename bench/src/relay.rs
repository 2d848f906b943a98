//! The relay scenario: preforkd's relay, HAProxy (`mode tcp`) and nginx's stream module, each
//! with 2 workers or threads, in front of the same tokio echo backend, plus the direct path
//! (client to backend) as the ceiling. The servers take turns each round.

use std::time::Duration;

use crate::load::{self, Report};
use crate::servers::{Kind, PreforkdOptions, Server};
use crate::{Row, binaries, installed, ms};

/// The proxies measured, in order; `None` is the direct path.
fn proxies(only: Option<&str>) -> Vec<Option<Kind>> {
    let mut kinds = vec![None, Some(Kind::PreforkdRelay)];
    for (kind, program) in [(Kind::Haproxy, "haproxy"), (Kind::NginxStream, "nginx")] {
        if installed(program) || std::path::Path::new(&format!("/usr/sbin/{program}")).is_file() {
            kinds.push(Some(kind));
        } else {
            eprintln!("note: {program} is not installed; skipped");
        }
    }
    match only {
        None => kinds,
        Some(list) => kinds
            .into_iter()
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
    let none = PreforkdOptions { workers: 1, per_client: 0, backend: None };
    let backend = match Server::start(Kind::Tokio, &binaries, &none) {
        Ok(server) => server,
        Err(error) => return eprintln!("tokio backend: {error}"),
    };
    let options = PreforkdOptions { workers: 2, per_client: 0, backend: Some(backend.addr) };
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
    }
    backend.stop();
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

fn print_table(name: &str, unit: &str, clients: usize, size: usize, rows: &[(Option<Kind>, Row)]) {
    let rate = |kind: Option<Kind>| {
        rows.iter().find(|(k, _)| *k == kind).map(|(_, r)| r.report.rate()).filter(|r| *r > 0.0)
    };
    let direct = rate(None);
    let relay = rate(Some(Kind::PreforkdRelay));
    let cpu_per_op = |row: &Row| {
        let ops = row.report.rate();
        if ops > 0.0 { row.cores / ops * 1e6 } else { 0.0 }
    };
    let haproxy_cpu = rows
        .iter()
        .find(|(k, _)| *k == Some(Kind::Haproxy))
        .map(|(_, row)| cpu_per_op(row))
        .filter(|c| *c > 0.0);
    println!("\n### relay {name}: {clients} clients, {size} B request/response\n");
    println!(
        "| path | {unit} | MB/s | vs direct | preforkd relay vs this | p50 ms | p99 ms | errors | proxy CPU cores | proxy CPU us/op | CPU vs HAProxy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (kind, row) in rows {
        let r = &row.report;
        let mb = r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6;
        let vs_direct = direct.map_or("-".into(), |d| format!("{:.2}", r.rate() / d));
        let relay_vs = match (relay, kind) {
            (Some(relay), Some(_)) if r.rate() > 0.0 => format!("{:.2}", relay / r.rate()),
            _ => "-".into(),
        };
        let (cores, per_op, vs_haproxy) = if kind.is_some() {
            let per_op = cpu_per_op(row);
            let vs = haproxy_cpu.map_or("-".into(), |h| format!("{:.2}", per_op / h));
            (format!("{:.2}", row.cores), format!("{per_op:.1}"), vs)
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        println!(
            "| {} | {:.0} | {mb:.1} | {vs_direct} | {relay_vs} | {} | {} | {} | {cores} | {per_op} | {vs_haproxy} |",
            label(*kind),
            r.rate(),
            ms(r.percentile(0.5)),
            ms(r.percentile(0.99)),
            r.errors,
        );
    }
}
