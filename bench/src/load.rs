//! Load generators: short connections, long request/response, idle connections, and one
//! client against its per-client limit. Blocking sockets, one thread per client loop; every
//! loop is bounded in time and in count.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

/// Iterations per client loop at most, whatever the duration.
pub(crate) const MAX_ITERATIONS: u64 = 10_000_000;

/// What a scenario measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Completed operations (connections for `short`, messages for `long`).
    pub operations: u64,
    /// Payload bytes echoed and verified.
    pub bytes: u64,
    /// Failed operations (refused, reset, wrong echo, timeout).
    pub errors: u64,
    /// Wall time measured.
    pub elapsed: Duration,
    /// Operation latencies, sorted (microseconds).
    pub latencies_us: Vec<u32>,
    /// Scenario-specific note (idle: how many were still served).
    pub note: String,
}

impl Report {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at `quantile` (0 to 1), in microseconds.
    pub fn percentile(&self, quantile: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let index = ((self.latencies_us.len() - 1) as f64 * quantile).round() as usize;
        self.latencies_us[index]
    }

    fn merge(&mut self, other: Report) {
        self.operations += other.operations;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
    }
}

/// A client socket from loopback address 127.0.0.`source`, so that many loops do not
/// share one source port range.
pub fn connect_from(source: u8, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, source), 0)).into())?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    socket.set_tcp_nodelay(true)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

pub(crate) fn source_of(client: usize) -> u8 {
    (2 + client % 200) as u8
}

pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Runs `loops` client threads for `duration`, each calling `body` until time is up.
pub(crate) fn run_loops(
    loops: usize,
    duration: Duration,
    body: impl Fn(usize, &AtomicBool) -> Report + Send + Sync + 'static,
) -> Report {
    let stop = Arc::new(AtomicBool::new(false));
    let body = Arc::new(body);
    let started = Instant::now();
    let threads: Vec<_> = (0..loops)
        .map(|client| {
            let (stop, body) = (Arc::clone(&stop), Arc::clone(&body));
            thread::spawn(move || body(client, &stop))
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::SeqCst);
    let mut total = Report::default();
    for thread in threads {
        if let Ok(report) = thread.join() {
            total.merge(report);
        }
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    total
}

/// `short`: connect, write `size` bytes, read the echo, close; `loops` clients at once.
pub fn short(addr: SocketAddr, loops: usize, size: usize, duration: Duration) -> Report {
    run_loops(loops, duration, move |client, stop| {
        let message = pattern(size, client as u64);
        let mut echoed = vec![0u8; size];
        let mut report = Report::default();
        let mut iterations = 0;
        while !stop.load(Ordering::Relaxed) && iterations < MAX_ITERATIONS {
            iterations += 1;
            let started = Instant::now();
            let outcome = connect_from(source_of(client), addr).and_then(|mut stream| {
                stream.write_all(&message)?;
                stream.read_exact(&mut echoed)?;
                Ok(())
            });
            match outcome {
                Ok(()) if echoed == message => {
                    report.operations += 1;
                    report.bytes += size as u64;
                    report
                        .latencies_us
                        .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                _ => report.errors += 1,
            }
        }
        report
    })
}

/// `long`: `loops` persistent connections, each doing request/response of `size` bytes and
/// verifying every echoed byte.
pub fn long(addr: SocketAddr, loops: usize, size: usize, duration: Duration) -> Report {
    run_loops(loops, duration, move |client, stop| {
        let message = pattern(size, client as u64);
        let mut echoed = vec![0u8; size];
        let mut report = Report::default();
        let Ok(mut stream) = connect_from(source_of(client), addr) else {
            report.errors += 1;
            return report;
        };
        let mut iterations = 0;
        while !stop.load(Ordering::Relaxed) && iterations < MAX_ITERATIONS {
            iterations += 1;
            let started = Instant::now();
            match stream.write_all(&message).and_then(|()| stream.read_exact(&mut echoed)) {
                Ok(()) if echoed == message => {
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

/// `idle`: open `count` connections and hold them; `measure` runs while they are held (to
/// read the server's memory); then every one must still echo. The report's operations are
/// the connections still served.
pub fn idle(addr: SocketAddr, count: usize, measure: impl FnOnce()) -> Report {
    let started = Instant::now();
    let mut streams = Vec::with_capacity(count);
    let mut report = Report::default();
    for i in 0..count {
        match connect_from(source_of(i), addr) {
            Ok(stream) => streams.push(stream),
            Err(_) => report.errors += 1,
        }
    }
    // Let the server accept them all: one exchange on the last one opened.
    if let Some(last) = streams.last_mut() {
        let _ = last.write_all(b"x").and_then(|()| last.read_exact(&mut [0u8; 1]));
    }
    measure();
    for stream in &mut streams {
        let mut byte = [0u8; 1];
        match stream.write_all(b"y").and_then(|()| stream.read_exact(&mut byte)) {
            Ok(()) if byte == *b"y" => report.operations += 1,
            _ => report.errors += 1,
        }
    }
    report.elapsed = started.elapsed();
    report.note = format!("{} of {count} served after holding", report.operations);
    report
}

/// `limit`: `count` connections from one source address; how many are served.
pub fn limit(addr: SocketAddr, count: usize) -> Report {
    let started = Instant::now();
    let mut streams: Vec<TcpStream> =
        (0..count).filter_map(|_| connect_from(250, addr).ok()).collect();
    let mut report = Report::default();
    for stream in &mut streams {
        let mut byte = [0u8; 1];
        match stream.write_all(b"z").and_then(|()| stream.read_exact(&mut byte)) {
            Ok(()) => report.operations += 1,
            Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
            }
            Err(_) => report.errors += 1,
        }
    }
    report.elapsed = started.elapsed();
    report.note = format!("{} of {count} from one address served", report.operations);
    report
}

/// `exchanges`: one client, a fixed amount of work whatever the speed (for instruction counts
/// under callgrind, where a duration would measure valgrind): `small` exchanges of 64 B on
/// one connection, `large` of 16 KiB on another, then `short` connections of one 64 B
/// exchange each. Every echoed byte is verified; each operation times out after 5 s.
pub fn exchanges(addr: SocketAddr, small: u64, large: u64, short: u64) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    for (size, count) in [(64, small), (16 * 1024, large)] {
        let message = pattern(size, count);
        let mut echoed = vec![0u8; size];
        let Ok(mut stream) = connect_from(2, addr) else {
            report.errors += count;
            continue;
        };
        for _ in 0..count {
            match stream.write_all(&message).and_then(|()| stream.read_exact(&mut echoed)) {
                Ok(()) if echoed == message => {
                    report.operations += 1;
                    report.bytes += size as u64;
                }
                _ => {
                    report.errors += 1;
                    break;
                }
            }
        }
    }
    let message = pattern(64, short);
    let mut echoed = [0u8; 64];
    for _ in 0..short {
        let outcome = connect_from(2, addr).and_then(|mut stream| {
            stream.write_all(&message)?;
            stream.read_exact(&mut echoed)?;
            // Wait for the server's side to end too (our FIN read, its FIN back), so the
            // next connection's events do not mix with this one's close.
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut rest = [0u8; 1];
            match stream.read(&mut rest)? {
                0 => Ok(()),
                _ => Err(ErrorKind::InvalidData.into()),
            }
        });
        match outcome {
            Ok(()) if echoed[..] == message[..] => {
                report.operations += 1;
                report.bytes += 64;
            }
            _ => report.errors += 1,
        }
    }
    report.elapsed = started.elapsed();
    report
}
