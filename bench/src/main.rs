//! `preforkd-bench`: runs preforkd (each event backend) and its peers (xinetd, tcpserver +
//! cat, socat fork, a tokio echo server) on loopback, one after the other, through the same
//! scenarios, and prints one markdown report. See BENCHMARKS.md and bench/run.sh.

mod handoff;
mod load;
mod relay;
mod servers;
mod tftp;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use load::Report;
use servers::{Binaries, Kind, PreforkdOptions, Server};

#[derive(Parser)]
#[command(about = "Benchmark preforkd against xinetd, tcpserver, socat and a tokio echo server")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Every scenario against every server; prints a markdown report.
    Run {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client loops for `short`.
        #[arg(long, default_value_t = 32)]
        short_clients: usize,
        /// Idle connections for epoll, poll and tokio (1000 for the others).
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Only these servers (labels as printed, comma-separated prefixes), default all.
        #[arg(long)]
        only: Option<String>,
        /// Rounds per scenario: the servers take turns each round, and each one's median
        /// round is reported, so drift hits all alike.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The relay scenario only: preforkd's relay, HAProxy and nginx stream in front of the
    /// tokio echo server, and the direct path; prints a markdown report.
    Relay {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client loops for `short`.
        #[arg(long, default_value_t = 32)]
        short_clients: usize,
        /// Only these proxies (labels as printed, comma-separated prefixes), default all.
        #[arg(long)]
        only: Option<String>,
        /// Rounds per scenario, the proxies taking turns; the median round is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The hand-off of relayed connections on a reload: one busy connection over many
    /// reloads, many busy ones, many idle ones (epoll); prints a markdown table.
    Handoff {
        /// Reloads for the single busy connection.
        #[arg(long, default_value_t = 20)]
        reloads: usize,
        /// Busy relayed connections handed off by one reload.
        #[arg(long, default_value_t = 100)]
        busy: usize,
        /// Idle relayed connections handed off by one reload.
        #[arg(long, default_value_t = 1000)]
        idle: usize,
        /// The relay's `splice` option.
        #[arg(long)]
        splice: bool,
    },
    /// TLS termination: preforkd against HAProxy, nginx stream and stunnel4 (TLS 1.3, ECDSA
    /// P-256): full and resumed handshakes/s, request/response; prints a markdown report.
    Tls {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client loops for the handshake scenarios.
        #[arg(long, default_value_t = 32)]
        loops: usize,
        /// Only these servers (labels as printed, comma-separated prefixes), default all.
        #[arg(long)]
        only: Option<String>,
        /// Rounds per scenario, the servers taking turns; the median round is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only these scenarios (comma-separated: full, resumed, small, large), default all.
        #[arg(long)]
        scenarios: Option<String>,
    },
    /// TFTP download throughput: preforkd against tftpd-hpa (`in.tftpd --listen`).
    Tftp {
        /// Rounds per cell: the two servers take turns, each one's median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// preforkd's event backend: select, poll or epoll.
        #[arg(long, default_value = "select")]
        backend: String,
        /// Only the cells with this blksize (512 or 1428), default both.
        #[arg(long)]
        blksize: Option<usize>,
        /// Only the cells with this windowsize (1 or 16), default both.
        #[arg(long)]
        windowsize: Option<u16>,
        /// preforkd's `busy_poll` option ("0s" turns it off), default the daemon's.
        #[arg(long)]
        busy_poll: Option<String>,
    },
    /// One scenario against a server you started: short or long.
    Load {
        /// short or long.
        scenario: String,
        /// Server address.
        #[arg(long)]
        addr: SocketAddr,
        /// Client loops.
        #[arg(short, long, default_value_t = 32)]
        clients: usize,
        /// Message size in bytes.
        #[arg(short, long, default_value_t = 64)]
        size: usize,
        /// Seconds.
        #[arg(short, long, default_value_t = 5)]
        duration: u64,
    },
    /// A fixed amount of echo work from one client, whatever the speed (bench/callgrind-echo.sh
    /// counts the worker's instructions under it): exchanges of 64 B and of 16 KiB on two
    /// connections, then short connections of one 64 B exchange each.
    Exchanges {
        /// Server address.
        #[arg(long)]
        addr: SocketAddr,
        /// Exchanges of 64 B on one connection.
        #[arg(long, default_value_t = 20_000)]
        small: u64,
        /// Exchanges of 16 KiB on one connection.
        #[arg(long, default_value_t = 2_000)]
        large: u64,
        /// Short connections (one 64 B exchange, then both sides close).
        #[arg(long, default_value_t = 2_000)]
        short: u64,
    },
}

fn main() {
    raise_nofile();
    match Cli::parse().command {
        Verb::Load { scenario, addr, clients, size, duration } => {
            let duration = Duration::from_secs(duration);
            let report = match scenario.as_str() {
                "short" => load::short(addr, clients, size, duration),
                _ => load::long(addr, clients, size, duration),
            };
            println!(
                "{:.0} ops/s, {:.1} MB/s, p50 {} us, p99 {} us, p999 {} us, {} errors",
                report.rate(),
                report.bytes as f64 / report.elapsed.as_secs_f64() / 1e6,
                report.percentile(0.5),
                report.percentile(0.99),
                report.percentile(0.999),
                report.errors
            );
        }
        Verb::Exchanges { addr, small, large, short } => {
            let report = load::exchanges(addr, small, large, short);
            println!(
                "{} operations, {} bytes echoed, {} errors, {:.1} s",
                report.operations,
                report.bytes,
                report.errors,
                report.elapsed.as_secs_f64()
            );
            if report.errors > 0 {
                std::process::exit(1);
            }
        }
        Verb::Relay { seconds, short_clients, only, rounds } => {
            relay::run(Duration::from_secs(seconds), short_clients, only.as_deref(), rounds.max(1))
        }
        Verb::Handoff { reloads, busy, idle, splice } => {
            handoff::run(reloads.max(1), busy.max(1), idle, splice)
        }
        Verb::Tls { seconds, loops, only, rounds, scenarios } => tls::run(
            Duration::from_secs(seconds),
            loops,
            only.as_deref(),
            rounds.max(1),
            scenarios.as_deref(),
        ),
        Verb::Tftp { rounds, backend, blksize, windowsize, busy_poll } => {
            let busy_poll = busy_poll.as_deref();
            tftp::run(&binaries().preforkd, &backend, busy_poll, rounds.max(1), blksize, windowsize)
        }
        Verb::Run { seconds, short_clients, idle, only, rounds } => {
            run(Duration::from_secs(seconds), short_clients, idle, only.as_deref(), rounds.max(1))
        }
    }
}

fn raise_nofile() {
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(1 << 20), hard);
    }
}

fn binaries() -> Binaries {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    Binaries { preforkd: dir.join("preforkd"), tokio: dir.join("tokio-echo") }
}

fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

const BACKENDS: [&str; 3] = ["select", "poll", "epoll"];

fn all_servers(only: Option<&str>) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = BACKENDS.iter().map(|b| Kind::Preforkd(b)).collect();
    kinds.push(Kind::Preforkd("epoll + reuseport"));
    kinds.push(Kind::PreforkdExec);
    for (kind, program) in [
        (Kind::Xinetd, "xinetd"),
        (Kind::XinetdCat, "xinetd"),
        (Kind::Tcpserver, "tcpserver"),
        (Kind::Socat, "socat"),
    ] {
        if installed(program) {
            kinds.push(kind);
        } else {
            eprintln!("note: {program} is not installed; skipped");
        }
    }
    kinds.push(Kind::Tokio);
    let kinds = servers::with_before(kinds);
    match only {
        None => kinds,
        Some(list) => kinds
            .into_iter()
            .filter(|k| list.split(',').any(|p| k.label().starts_with(p)))
            .collect(),
    }
}

struct Row {
    kind: Kind,
    report: Report,
    cores: f64,
    extra: String,
}

fn ticks_per_second() -> f64 {
    100.0 // USER_HZ on Linux
}

/// Starts `kind`, runs `scenario` against it, measures its CPU, stops it.
fn measure(
    kind: Kind,
    options: &PreforkdOptions,
    scenario: impl FnOnce(&Server) -> (Report, String),
) -> Option<Row> {
    let binaries = binaries();
    let server = match Server::start(kind, &binaries, options) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("{}: {error}", kind.label());
            return None;
        }
    };
    let before = server.cpu_ticks();
    let (report, extra) = scenario(&server);
    let used = server.cpu_ticks().saturating_sub(before) as f64 / ticks_per_second();
    let cores = used / report.elapsed.as_secs_f64().max(1e-9);
    server.stop();
    eprintln!("  {:<20} {:>10.0}/s  {} errors", kind.label(), report.rate(), report.errors);
    Some(Row { kind, report, cores, extra })
}

/// For preforkd: how evenly the workers shared the accepted connections.
fn balance(server: &Server) -> String {
    let Some(config) = &server.config else { return String::new() };
    let Some(rows) = servers::status(&binaries().preforkd, config) else { return String::new() };
    let counts: Vec<u64> = rows.iter().map(|r| r.accepted).collect();
    let total: u64 = counts.iter().sum();
    let busiest = counts.iter().copied().max().unwrap_or(0);
    if total == 0 || counts.is_empty() {
        return String::new();
    }
    let fair = total as f64 / counts.len() as f64;
    format!("busiest worker {:.2}x fair share ({counts:?})", busiest as f64 / fair)
}

fn ms(us: u32) -> String {
    format!("{:.2}", f64::from(us) / 1000.0)
}

fn ratio(value: f64, reference: Option<f64>) -> String {
    reference.filter(|r| *r > 0.0).map_or("-".into(), |r| format!("{:.2}", value / r))
}

fn print_rate_table(title: &str, unit: &str, rows: &[Row], with_mb: bool) {
    let reference = rows.iter().find(|r| r.kind == Kind::Tokio).map(|r| r.report.rate());
    let reference_mb = rows
        .iter()
        .find(|r| r.kind == Kind::Tokio)
        .map(|r| r.report.bytes as f64 / r.report.elapsed.as_secs_f64() / 1e6);
    println!("\n### {title}\n");
    if with_mb {
        println!(
            "| server | {unit} | MB/s | vs tokio | p50 ms | p99 ms | p999 ms | errors | CPU cores | notes |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    } else {
        println!(
            "| server | {unit} | vs tokio | p50 ms | p99 ms | p999 ms | errors | CPU cores | notes |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    }
    for row in rows {
        let r = &row.report;
        let mb = r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6;
        let vs = if with_mb { ratio(mb, reference_mb) } else { ratio(r.rate(), reference) };
        let mb_cell = if with_mb { format!(" {mb:.1} |") } else { String::new() };
        println!(
            "| {} | {:.0} |{mb_cell} {vs} | {} | {} | {} | {} | {:.2} | {} |",
            row.kind.label(),
            r.rate(),
            ms(r.percentile(0.5)),
            ms(r.percentile(0.99)),
            ms(r.percentile(0.999)),
            r.errors,
            row.cores,
            row.extra
        );
    }
}

/// Measures every server `rounds` times, taking turns, and keeps each one's median run.
fn rounds_of(kinds: &[Kind], rounds: usize, mut one: impl FnMut(Kind) -> Option<Row>) -> Vec<Row> {
    let mut runs: Vec<Vec<Row>> = kinds.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (index, &kind) in kinds.iter().enumerate() {
            runs[index].extend(one(kind));
        }
    }
    runs.into_iter()
        .filter_map(|mut rows| {
            rows.sort_by(|a, b| a.report.rate().total_cmp(&b.report.rate()));
            let middle = rows.len() / 2;
            (!rows.is_empty()).then(|| rows.swap_remove(middle))
        })
        .collect()
}

fn run(duration: Duration, short_clients: usize, idle: usize, only: Option<&str>, rounds: usize) {
    let kinds = all_servers(only);
    let plain = PreforkdOptions { workers: 2, per_client: 0, backend: None, tls: None, log: None };
    println!("## Results\n");
    println!(
        "{} s per run, {rounds} rounds with the servers taking turns (each server's median round is shown), \
         servers on 127.0.0.1, clients from 127.0.0.2-201; preforkd with 2 workers. \
         CPU cores: the server's CPU time over the run's wall time.",
        duration.as_secs()
    );

    eprintln!("short: {short_clients} loops of connect, 64 B exchange, close");
    let rows = rounds_of(&kinds, rounds, |kind| {
        measure(kind, &plain, |server| {
            let report = load::short(server.addr, short_clients, 64, duration);
            (report, balance(server))
        })
    });
    print_rate_table(
        &format!("short: {short_clients} client loops, connect + 64 B echo + close"),
        "conn/s",
        &rows,
        false,
    );

    for (clients, size) in [(50, 64), (500, 64), (50, 16 * 1024), (500, 16 * 1024)] {
        eprintln!("long: {clients} connections, {size} B request/response");
        let rows: Vec<Row> = kinds
            .iter()
            .filter_map(|&kind| {
                measure(kind, &plain, |server| {
                    (load::long(server.addr, clients, size, duration), String::new())
                })
            })
            .collect();
        print_rate_table(
            &format!("long: {clients} connections, {size} B request/response, every byte verified"),
            "msg/s",
            &rows,
            true,
        );
    }

    eprintln!("idle");
    println!("\n### idle: connections held open, then each must still echo\n");
    println!(
        "| server | connections | served after holding | PSS before KiB | PSS with them KiB | KiB per connection |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for &kind in &kinds {
        let plain = match kind {
            Kind::Before(inner) => *inner,
            kind => kind,
        };
        let scalable = matches!(plain, Kind::Preforkd(b) if b != "select") || kind == Kind::Tokio;
        let count = if scalable { idle } else { idle.min(1000) };
        let options =
            PreforkdOptions { workers: 1, per_client: 0, backend: None, tls: None, log: None };
        let Ok(server) = Server::start(kind, &binaries(), &options) else { continue };
        let before = server.pss_kib();
        let mut during = 0;
        let report = load::idle(server.addr, count, || during = server.pss_kib());
        server.stop();
        let per = during.saturating_sub(before) as f64 / count as f64;
        eprintln!("  {:<20} {}", kind.label(), report.note);
        println!(
            "| {} | {count} | {} | {before} | {during} | {per:.2} |",
            kind.label(),
            report.operations
        );
    }

    if kinds.iter().any(|k| matches!(k, Kind::Preforkd(_))) {
        eprintln!("limit");
        println!("\n### limit: 50 connections from one address, max_connections_per_client = 10\n");
        let options =
            PreforkdOptions { workers: 2, per_client: 10, backend: None, tls: None, log: None };
        if let Ok(server) = Server::start(Kind::Preforkd("select"), &binaries(), &options) {
            let report = load::limit(server.addr, 50);
            server.stop();
            println!("preforkd (select): {}, {} errors.", report.note, report.errors);
        }

        eprintln!("limit cost");
        let limited = PreforkdOptions {
            workers: 2,
            per_client: 1_000_000,
            backend: None,
            tls: None,
            log: None,
        };
        let rate = |options: &PreforkdOptions| {
            measure(Kind::Preforkd("select"), options, |s| {
                (load::short(s.addr, short_clients, 64, duration), String::new())
            })
            .map(|row| row.report.rate())
        };
        let (without, with) = (rate(&plain), rate(&limited));
        if let (Some(without), Some(with)) = (without, with) {
            println!(
                "\nPer-client limit path: short with max_connections_per_client = 1000000 (counted, never refused) \
                 {with:.0} conn/s vs {without:.0} without limits: {:.1}% cost.",
                (1.0 - with / without) * 100.0
            );
        }

        eprintln!("wake-ups at rest");
        println!("\n### wake-ups at rest (10 s, no traffic, default worker_timeout = 30s)\n");
        println!("| server | wake-ups per second, all processes |");
        println!("|---|---:|");
        for backend in BACKENDS {
            let Ok(server) = Server::start(Kind::Preforkd(backend), &binaries(), &plain) else {
                continue;
            };
            let before = server.wakeups();
            std::thread::sleep(Duration::from_secs(10));
            let rate = server.wakeups().saturating_sub(before) as f64 / 10.0;
            server.stop();
            println!("| preforkd ({backend}) | {rate:.1} |");
        }
    }
}
