//! The hand-off of relayed connections on a reload: preforkd's relay (epoll, one worker) in
//! front of the tokio echo server, with relayed connections busy (each in a loop of 64 B
//! exchanges) or idle (held). The times come from the old worker's own log, at its
//! millisecond resolution: from its `retiring` line (the master retired it) to its last
//! `handed off (Adopted)` line, one per connection; a single connection is measured over
//! many reloads and averaged. The busy clients also report the longest exchange they saw
//! during the reloads (what a client notices of a hand-off) against their median.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::binaries;
use crate::servers::{Kind, PreforkdOptions, Server};

/// Milliseconds since midnight of a log line's timestamp (`2026-01-01T12:34:56.789Z ...`).
fn stamp_ms(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    Some((parts.first()? * 3600.0 + parts.get(1)? * 60.0 + parts.get(2)?) * 1000.0)
}

/// The `pid=N:` of a worker's log line.
fn pid_of(line: &str) -> Option<&str> {
    line.split("pid=").nth(1)?.split(':').next()
}

/// For each worker that retired in `log`: (its `retiring` time, its hand-off times), ms.
fn drains(log: &str) -> Vec<(f64, Vec<f64>)> {
    let mut drains: Vec<(String, f64, Vec<f64>)> = Vec::new();
    for line in log.lines() {
        let (Some(pid), Some(at)) = (pid_of(line), stamp_ms(line)) else { continue };
        if line.contains(": retiring: no longer accepting") {
            drains.push((pid.to_owned(), at, Vec::new()));
        } else if line.contains("handed off (Adopted)")
            && let Some(drain) = drains.iter_mut().rev().find(|d| d.0 == pid)
        {
            drain.2.push(at);
        }
    }
    drains.into_iter().map(|(_, at, handed)| (at, handed)).collect()
}

/// A client in a loop of 64 B exchanges until stopped: its exchange times, in µs.
fn ping_pong(addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<Result<Vec<u32>, String>> {
    thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let message = [7u8; 64];
        let mut echoed = [0u8; 64];
        let mut times = Vec::new();
        // Bounded whatever the caller does: at most 10 million exchanges.
        while !stop.load(Ordering::Relaxed) && times.len() < 10_000_000 {
            let started = Instant::now();
            stream.write_all(&message).map_err(|e| format!("write: {e}"))?;
            stream.read_exact(&mut echoed).map_err(|e| format!("read: {e}"))?;
            if echoed != message {
                return Err("wrong echo".into());
            }
            times.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        Ok(times)
    })
}

fn reload(config: &Path) -> Result<(), String> {
    let output = Command::new(&binaries().preforkd)
        .arg("reload")
        .arg("-c")
        .arg(config)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Waits until the log shows `count` retired workers that handed off `each` connections, at
/// most 10 s; returns the log.
fn wait_drains(log_path: &Path, count: usize, each: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        let done = drains(&log).iter().filter(|(_, handed)| handed.len() >= each).count();
        if done >= count || Instant::now() >= deadline {
            return log;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the three measurements and prints a markdown table.
pub fn run(reloads: usize, busy: usize, idle: usize, splice: bool) {
    let binaries = binaries();
    let none = PreforkdOptions { workers: 1, per_client: 0, backend: None, tls: None, log: None };
    let backend = match Server::start(Kind::Tokio, &binaries, &none) {
        Ok(server) => server,
        Err(error) => return eprintln!("tokio backend: {error}"),
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log_path = dir.path().join("preforkd.log");
    let options = PreforkdOptions {
        workers: 1,
        per_client: 0,
        backend: Some(backend.addr),
        tls: None,
        log: Some(log_path.clone()),
    };
    let relay = match Server::start(Kind::PreforkdRelay { splice }, &binaries, &options) {
        Ok(server) => server,
        Err(error) => {
            backend.stop();
            return eprintln!("preforkd relay: {error}");
        }
    };
    let config = relay.config.clone().expect("preforkd has a configuration");
    let pump = if splice { "splice" } else { "read/write" };
    println!("## Hand-off of relayed connections on a reload\n");
    println!(
        "preforkd relay ({pump}, epoll, 1 worker) in front of the tokio echo server, on \
         127.0.0.1. Times from the old worker's log (millisecond resolution): from its \
         `retiring` line to its last `handed off` line. Busy clients do 64 B exchanges without \
         pause; their worst exchange during the reloads is what a client notices.\n"
    );
    println!(
        "| scenario | connections | reloads | retire to last hand-off, ms | per connection, µs | client exchange p50 / worst, ms | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut errors = Vec::new();

    for (name, clients, rounds) in [("one busy connection", 1, reloads), ("busy", busy, 1)] {
        eprintln!("hand-off: {name}: {clients} connections, {rounds} reloads");
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> =
            (0..clients).map(|_| ping_pong(relay.addr, Arc::clone(&stop))).collect();
        thread::sleep(Duration::from_millis(300)); // the clients get going
        let before = drains(&std::fs::read_to_string(&log_path).unwrap_or_default()).len();
        for round in 1..=rounds {
            if let Err(error) = reload(&config) {
                errors.push(format!("reload: {error}"));
            }
            // The next reload once this one's hand-offs are done.
            wait_drains(&log_path, before + round, clients);
        }
        thread::sleep(Duration::from_millis(300)); // the clients go on after the last
        stop.store(true, Ordering::Relaxed);
        let mut times = Vec::new();
        for thread in threads {
            match thread.join() {
                Ok(Ok(mut taken)) => times.append(&mut taken),
                Ok(Err(error)) => errors.push(error),
                Err(_) => errors.push("a client panicked".into()),
            }
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let spans: Vec<f64> = drains(&log)[before..]
            .iter()
            .filter(|(_, handed)| handed.len() == clients)
            .map(|(at, handed)| handed.iter().copied().fold(*at, f64::max) - at)
            .collect();
        let measured = spans.len();
        let mean = spans.iter().sum::<f64>() / measured.max(1) as f64;
        times.sort_unstable();
        let p50 = times.get(times.len() / 2).copied().unwrap_or(0);
        let worst = times.last().copied().unwrap_or(0);
        println!(
            "| {name} | {clients} | {measured} | {mean:.1} | {:.0} | {:.2} / {:.2} | {} |",
            mean * 1000.0 / clients as f64,
            f64::from(p50) / 1000.0,
            f64::from(worst) / 1000.0,
            errors.len()
        );
    }

    eprintln!("hand-off: {idle} idle connections");
    let mut held = Vec::new();
    for _ in 0..idle {
        match TcpStream::connect(relay.addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"x")?;
            s.read_exact(&mut [0u8; 1])?;
            Ok(s)
        }) {
            Ok(stream) => held.push(stream),
            Err(error) => {
                errors.push(format!("idle connection: {error}"));
                break;
            }
        }
    }
    let before = drains(&std::fs::read_to_string(&log_path).unwrap_or_default()).len();
    if let Err(error) = reload(&config) {
        errors.push(format!("reload: {error}"));
    }
    let log = wait_drains(&log_path, before + 1, held.len());
    let after: Vec<_> = drains(&log).into_iter().skip(before).collect();
    for stream in &mut held {
        let moved = stream.write_all(b"y").and_then(|()| stream.read_exact(&mut [0u8; 1]));
        if let Err(error) = moved {
            errors.push(format!("idle connection after the reload: {error}"));
        }
    }
    if let Some((at, handed)) = after.first() {
        let span = handed.iter().copied().fold(*at, f64::max) - at;
        println!(
            "| idle | {} | 1 | {span:.1} | {:.1} | - | {} |",
            handed.len(),
            span * 1000.0 / handed.len().max(1) as f64,
            errors.len()
        );
    }
    drop(held);
    for error in &errors {
        eprintln!("error: {error}");
    }
    relay.stop();
    backend.stop();
}
