//! `preforkd-bench tftp`: download throughput of preforkd's TFTP service against tftpd-hpa
//! (`in.tftpd --listen`), with the same client (written here: RFC 1350 with blksize and
//! windowsize), at blksize 512 and 1428 and windowsize 1 and 16: one 100 MiB file, and 200
//! concurrent 1 MiB transfers. The servers take turns each round; each one's median round
//! is reported.
//!
//! Both servers run on 127.0.0.1, each on a port of its own, in their own process group,
//! and are stopped by pid. Every transfer is bounded: a client gives up after
//! [`RETRIES`] silent timeouts of [`TIMEOUT`]; every byte count is checked.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Client retransmission timeout (of its last ACK).
const TIMEOUT: Duration = Duration::from_millis(200);
/// Silent timeouts in a row before a client gives up.
const RETRIES: u32 = 25;
/// Concurrent transfers in the `many` scenario.
const CONCURRENT: usize = 200;

/// A TFTP server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tftpd {
    /// preforkd, 2 workers.
    Preforkd,
    /// tftpd-hpa's `in.tftpd --listen`.
    Hpa,
}

impl Tftpd {
    fn label(self) -> &'static str {
        match self {
            Tftpd::Preforkd => "preforkd",
            Tftpd::Hpa => "tftpd-hpa",
        }
    }
}

struct Running {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Our own child, in its own process group: the group is the server's processes.
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map_or(0, |a| a.port())
}

fn start(
    kind: Tftpd,
    preforkd: &Path,
    backend: &str,
    busy_poll: Option<&str>,
    root: &Path,
    dir: &Path,
) -> std::io::Result<Running> {
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut command = match kind {
        Tftpd::Preforkd => {
            let config = dir.join("tftp.toml");
            std::fs::write(
                &config,
                format!(
                    "[daemon]\nworkers = 2\nevent_backend = \"{backend}\"\nallow_root_workers = true\n\
                     [log]\nlevel = \"warn\"\naccess_log = false\n\
                     [[listener]]\nname = \"tftp\"\naddress = \"{addr}\"\nservice = \"tftp\"\n\
                     transport = \"udp\"\nmax_connections_per_client = 0\n\
                     [listener.options]\nroot = \"{}\"\n{}",
                    root.display(),
                    busy_poll.map(|b| format!("busy_poll = \"{b}\"\n")).unwrap_or_default(),
                ),
            )?;
            let mut command = Command::new(preforkd);
            command.arg("-c").arg(config);
            command
        }
        Tftpd::Hpa => {
            let mut command = Command::new("in.tftpd");
            command
                .args(["--listen", "--foreground", "--user", "root", "--secure", "--address"])
                .arg(addr.to_string())
                .arg(root);
            command
        }
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let running = Running { addr, child };
    // Ready when a tiny file comes back (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetch(addr, 2, "ready", 512, 1).is_err() {
        if Instant::now() >= deadline {
            return Err(std::io::Error::other(format!("{} did not answer", kind.label())));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(running)
}

/// Downloads `name` from `server` as client 127.0.0.`source`, with `blksize` and
/// `windowsize` asked for when not the RFC 1350 defaults; returns the bytes received.
pub fn fetch(
    server: SocketAddr,
    source: u8,
    name: &str,
    blksize: usize,
    windowsize: u16,
) -> std::io::Result<u64> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, source), 0))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let mut request = vec![0, 1];
    let mut fields: Vec<String> = vec![name.into(), "octet".into()];
    if blksize != 512 {
        fields.extend(["blksize".into(), blksize.to_string()]);
    }
    if windowsize != 1 {
        fields.extend(["windowsize".into(), windowsize.to_string()]);
    }
    for field in &fields {
        request.extend_from_slice(field.as_bytes());
        request.push(0);
    }
    socket.send_to(&request, server)?;
    let mut buffer = vec![0u8; 65_536];
    let (mut blksize, mut window) = (512usize, 1u16);
    let mut tid: Option<SocketAddr> = None;
    let mut expected: u64 = 1;
    let mut in_window = 0u16;
    let mut received = 0u64;
    let mut silent = 0;
    loop {
        let (n, from) = match socket.recv_from(&mut buffer) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                silent += 1;
                if silent > RETRIES {
                    return Err(std::io::Error::other("server silent"));
                }
                match tid {
                    None => socket.send_to(&request, server)?,
                    Some(tid) => socket.send_to(&ack(expected - 1), tid)?,
                };
                in_window = 0;
                continue;
            }
            Err(e) => return Err(e),
        };
        if tid.is_some_and(|t| t != from) || n < 4 {
            continue;
        }
        tid = Some(from);
        silent = 0;
        let opcode = u16::from_be_bytes([buffer[0], buffer[1]]);
        match opcode {
            6 => {
                // OACK: take what the server granted.
                let fields: Vec<&[u8]> = buffer[2..n].split(|&b| b == 0).collect();
                for pair in fields.chunks(2) {
                    if let [key, value] = pair {
                        let value: u64 = std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        match key.to_ascii_lowercase().as_slice() {
                            b"blksize" => blksize = value as usize,
                            b"windowsize" => window = value as u16,
                            _ => {}
                        }
                    }
                }
                socket.send_to(&ack(0), from)?;
            }
            3 => {
                let block = u16::from_be_bytes([buffer[2], buffer[3]]);
                if block != expected as u16 {
                    // A gap or a repeat: say where we are, and the window restarts there.
                    socket.send_to(&ack(expected - 1), from)?;
                    in_window = 0;
                    continue;
                }
                let data = n - 4;
                received += data as u64;
                expected += 1;
                in_window += 1;
                if data < blksize {
                    socket.send_to(&ack(expected - 1), from)?;
                    return Ok(received);
                }
                if in_window >= window {
                    socket.send_to(&ack(expected - 1), from)?;
                    in_window = 0;
                }
            }
            5 => return Err(std::io::Error::other("server sent an error")),
            _ => {}
        }
    }
}

fn ack(block: u64) -> [u8; 4] {
    let [c, d] = (block as u16).to_be_bytes();
    [0, 4, c, d]
}

/// MB/s of one download of `name` (`size` bytes).
fn one(addr: SocketAddr, name: &str, size: u64, blksize: usize, window: u16) -> Option<f64> {
    let started = Instant::now();
    match fetch(addr, 2, name, blksize, window) {
        Ok(got) if got == size => Some(size as f64 / started.elapsed().as_secs_f64() / 1e6),
        Ok(got) => {
            eprintln!("  short transfer: {got} of {size} bytes");
            None
        }
        Err(error) => {
            eprintln!("  transfer failed: {error}");
            None
        }
    }
}

/// Aggregate MB/s of [`CONCURRENT`] downloads of `name` at once, from 127.0.0.2-201.
fn many(addr: SocketAddr, name: &str, size: u64, blksize: usize, window: u16) -> Option<f64> {
    let started = Instant::now();
    let handles: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let name = name.to_owned();
            thread::spawn(move || fetch(addr, 2 + i as u8, &name, blksize, window))
        })
        .collect();
    let mut ok = 0;
    for handle in handles {
        if matches!(handle.join(), Ok(Ok(got)) if got == size) {
            ok += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if ok < CONCURRENT {
        eprintln!("  {} of {CONCURRENT} transfers failed", CONCURRENT - ok);
        return None;
    }
    Some(size as f64 * CONCURRENT as f64 / elapsed / 1e6)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Runs every cell `rounds` times, servers alternating, and prints a markdown table.
pub fn run(
    preforkd: &Path,
    backend: &str,
    busy_poll: Option<&str>,
    rounds: usize,
    only_blksize: Option<usize>,
    only_window: Option<u16>,
) {
    if !crate::installed("in.tftpd") {
        eprintln!("in.tftpd is not installed (apt-get install tftpd-hpa); nothing to compare");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root: PathBuf = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    // in.tftpd --secure chroots into root and serves as root (--user root): readable.
    const BIG: u64 = 100 << 20;
    const SMALL: u64 = 1 << 20;
    for (name, size) in [("big", BIG), ("small", SMALL), ("ready", 1)] {
        let bytes: Vec<u8> = (0..size).map(|i| ((i * 2_654_435_761) >> 13) as u8).collect();
        std::fs::write(root.join(name), bytes).expect("write a file to serve");
    }
    println!(
        "\n### TFTP download throughput, MB/s (median of {rounds} rounds; preforkd: {backend}, 2 workers, busy_poll {})\n",
        busy_poll.unwrap_or("default")
    );
    println!("| scenario | blksize | windowsize | preforkd | tftpd-hpa | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (scenario, name, size) in
        [("100 MiB, one client", "big", BIG), ("200 x 1 MiB at once", "small", SMALL)]
    {
        for blksize in [512, 1428].into_iter().filter(|b| only_blksize.is_none_or(|o| o == *b)) {
            for window in [1u16, 16].into_iter().filter(|w| only_window.is_none_or(|o| o == *w)) {
                let mut results: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
                for round in 0..rounds {
                    // Alternate who goes first, so drift hits both alike.
                    let order = if round % 2 == 0 {
                        [Tftpd::Preforkd, Tftpd::Hpa]
                    } else {
                        [Tftpd::Hpa, Tftpd::Preforkd]
                    };
                    for kind in order {
                        let server =
                            match start(kind, preforkd, backend, busy_poll, &root, dir.path()) {
                                Ok(server) => server,
                                Err(error) => {
                                    eprintln!("{}: {error}", kind.label());
                                    continue;
                                }
                            };
                        let rate = if name == "big" {
                            one(server.addr, name, size, blksize, window)
                        } else {
                            many(server.addr, name, size, blksize, window)
                        };
                        drop(server);
                        eprintln!(
                            "  {scenario} blksize {blksize} window {window} {}: {rate:?}",
                            kind.label()
                        );
                        if let Some(rate) = rate {
                            results[usize::from(kind == Tftpd::Hpa)].push(rate);
                        }
                    }
                }
                let [ours, theirs] = results.map(median);
                let cell = |v: Option<f64>| v.map_or("failed".into(), |v| format!("{v:.1}"));
                let ratio = match (ours, theirs) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                    _ => "-".into(),
                };
                println!(
                    "| {scenario} | {blksize} | {window} | {} | {} | {ratio} |",
                    cell(ours),
                    cell(theirs)
                );
            }
        }
    }
}
