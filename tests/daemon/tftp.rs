//! TFTP with the real clients CI installs (tftp-hpa's `tftp`, `atftp`, `curl`), and with a
//! raw client for the error cases, a client that stops acknowledging and write requests.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// The files every client downloads: name and size.
const FILES: &[(&str, usize)] = &[
    ("empty", 0),
    ("short-511", 511),
    ("exact-512", 512),
    ("one-mib", 1 << 20),
    // 81,920 blocks of 512 bytes: the block number rolls over past 65,535.
    ("forty-mib", 40 << 20),
];

struct Server {
    daemon: Daemon,
    root: tempfile::TempDir,
    /// Where clients write what they got.
    out: tempfile::TempDir,
}

fn tftp_config(workers: usize, listener: &str, options: &str) -> String {
    format!(
        "[daemon]\nworkers = {workers}\nallow_root_workers = true\n[log]\nlevel = \"debug\"\n\
         [[listener]]\nname = \"tftp\"\naddress = \"127.0.0.1:0\"\nservice = \"tftp\"\ntransport = \"udp\"\n{listener}\n\
         [listener.options]\nroot = \"@ROOT@\"\n{options}\n"
    )
}

impl Server {
    fn start(workers: usize, listener: &str, options: &str, files: &[(&str, usize)]) -> Server {
        let root = tempfile::tempdir().unwrap();
        for (seed, (name, size)) in files.iter().enumerate() {
            std::fs::write(root.path().join(name), random_bytes(*size, seed as u64 + 1)).unwrap();
        }
        let config = tftp_config(workers, listener, options)
            .replace("@ROOT@", root.path().to_str().unwrap());
        let daemon = Daemon::start(&config);
        Server { daemon, root, out: tempfile::tempdir().unwrap() }
    }

    fn port(&self) -> String {
        self.daemon.addr().port().to_string()
    }

    fn served(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.root.path().join(name)).unwrap()
    }

    fn got(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }

    /// Checks that `client` fetched `name` byte for byte (then removes the copy).
    fn assert_same(&self, client: &str, name: &str) {
        let copy = self.got(name);
        let got = std::fs::read(&copy).unwrap_or_else(|e| panic!("{client}: no {name}: {e}"));
        let want = self.served(name);
        assert!(got == want, "{client}: {name} differs ({} bytes, want {})", got.len(), want.len());
        std::fs::remove_file(copy).unwrap();
    }
}

/// Runs a real client to completion within [`PATIENCE`].
fn run(program: &str, args: &[&str], cwd: &Path) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed for this test (.ci/run installs it): {e}"));
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{program} {args:?} did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

fn tftp_hpa(server: &Server, mode: &str, name: &str) -> Output {
    let local = server.got(name);
    let port = server.port();
    let args = ["-m", mode, "127.0.0.1", &port, "-c", "get", name, local.to_str().unwrap()];
    run("tftp", &args, server.out.path())
}

fn atftp(server: &Server, options: &[&str], name: &str) -> Output {
    let local = server.got(name);
    let port = server.port();
    let mut args = vec!["-g", "-r", name, "-l", local.to_str().unwrap()];
    for option in options {
        args.extend(["--option", option]);
    }
    args.extend(["127.0.0.1", &port]);
    run("atftp", &args, server.out.path())
}

fn curl(server: &Server, options: &[&str], name: &str) -> Output {
    let url = format!("tftp://127.0.0.1:{}/{name}", server.port());
    let local = server.got(name);
    let mut args = vec!["-sS", "-o", local.to_str().unwrap()];
    args.extend(options);
    args.push(&url);
    run("curl", &args, server.out.path())
}

#[test]
fn real_clients_download_every_size_byte_exact_with_and_without_options() {
    let server = Server::start(2, "", "", FILES);
    let small = &FILES[..4];
    for (name, _) in small {
        assert!(tftp_hpa(&server, "binary", name).status.success());
        server.assert_same("tftp", name);
        for options in [&[][..], &["blksize 1428", "windowsize 16"][..]] {
            let output = atftp(&server, options, name);
            assert!(output.status.success(), "atftp {options:?} {name}: {output:?}");
            server.assert_same("atftp", name);
        }
        // With options, curl asks for `tsize` too: an empty file's is left out of the OACK
        // (curl rejects `tsize=0`).
        for options in [&["--tftp-no-options"][..], &["--tftp-blksize", "1428"][..]] {
            let output = curl(&server, options, name);
            assert!(output.status.success(), "curl {options:?} {name}: {output:?}");
            server.assert_same("curl", name);
        }
    }
    // 40 MiB: tftp-hpa in lock-step with 512-byte blocks and atftp with a window of 16
    // both roll the block number over; curl takes the larger blocks.
    let (big, _) = FILES[4];
    assert!(tftp_hpa(&server, "binary", big).status.success());
    server.assert_same("tftp", big);
    let output = atftp(&server, &["windowsize 16"], big);
    assert!(output.status.success(), "{output:?}");
    server.assert_same("atftp", big);
    let output = curl(&server, &["--tftp-blksize", "1428"], big);
    assert!(output.status.success(), "{output:?}");
    server.assert_same("curl", big);

    let lines = server.daemon.wait_for_lines("an access line per transfer", 4 * 5 - 1 + 3, |l| {
        l.contains("access listener=tftp") && l.contains("result=complete")
    });
    let rollover = lines
        .iter()
        .find(|l| l.contains("forty-mib") && field(l, "options") == Some("-"))
        .expect("the lock-step 40 MiB transfer");
    assert_eq!(field(rollover, "blocks"), Some("81921"), "{rollover}");
    assert_eq!(field(rollover, "bytes"), Some("41943040"), "{rollover}");
    assert!(
        lines.iter().any(|l| field(l, "options") == Some("blksize=1428,windowsize=16")),
        "atftp's options were acknowledged: {lines:#?}"
    );
}

#[test]
fn netascii_turns_line_ends_into_cr_lf_and_back() {
    let server = Server::start(1, "", "", &[]);
    let text = b"line one\nline two\r\nbare cr\rend\n".repeat(40);
    std::fs::write(server.root.path().join("text"), &text).unwrap();
    // tftp-hpa translates back to local line ends: the file comes back as it was.
    let output = tftp_hpa(&server, "ascii", "text");
    assert!(output.status.success(), "{output:?}");
    server.assert_same("tftp", "text");
    // On the wire, every LF is CR LF and every CR is CR NUL.
    let client = raw_client();
    let first = request(&client, server.daemon.addr(), 1, "text", "netascii", &[]);
    let (_, tid) = first;
    assert_eq!(&first.0[..4], &[0, 3, 0, 1]);
    assert_eq!(&first.0[4..24], b"line one\r\nline two\r\0");
    client.send_to(&[0, 5, 0, 0, 0], tid).unwrap();
}

fn raw_client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    socket
}

/// Sends a request (opcode 1 read, 2 write) and returns the first packet back and its TID.
fn request(
    socket: &UdpSocket,
    server: SocketAddr,
    opcode: u8,
    name: &str,
    mode: &str,
    options: &[(&str, &str)],
) -> (Vec<u8>, SocketAddr) {
    let mut packet = vec![0, opcode];
    for field in [name, mode].into_iter().chain(options.iter().flat_map(|(n, v)| [*n, *v])) {
        packet.extend_from_slice(field.as_bytes());
        packet.push(0);
    }
    socket.send_to(&packet, server).unwrap();
    receive(socket)
}

fn receive(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buffer = vec![0u8; 70_000];
    let (n, from) =
        uninterrupted(|| socket.recv_from(&mut buffer)).expect("an answer within the patience");
    buffer.truncate(n);
    (buffer, from)
}

/// The error code of an ERROR packet.
fn error_code(packet: &[u8]) -> u16 {
    assert_eq!(packet[..2], [0, 5], "an ERROR packet: {packet:?}");
    u16::from_be_bytes([packet[2], packet[3]])
}

#[test]
fn missing_files_and_escapes_get_their_errors_and_nothing_is_read() {
    let server = Server::start(1, "", "", &[("inside", 100)]);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let root = server.root.path();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("leak")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("leakdir")).unwrap();
    let addr = server.daemon.addr();
    let client = raw_client();
    let code = |name: &str| {
        let (packet, tid) = request(&client, addr, 1, name, "octet", &[]);
        assert_ne!(tid, addr, "errors come from the transfer's own port");
        error_code(&packet)
    };
    assert_eq!(code("missing"), 1, "file not found");
    assert_eq!(code("../etc/passwd"), 2);
    assert_eq!(code("/../etc/passwd"), 2);
    let escape = format!("../{}/secret", outside.path().file_name().unwrap().to_str().unwrap());
    assert_eq!(code(&escape), 2);
    assert_eq!(code("leak"), 2, "a symlink that leaves root");
    assert_eq!(code("leakdir/secret"), 2, "a directory symlink that leaves root");
    // An absolute name is taken relative to root: the file outside is not what it names.
    let absolute = outside.path().join("secret");
    assert_eq!(code(absolute.to_str().unwrap()), 1);
    for name in ["/inside", "inside"] {
        let (packet, tid) = request(&client, addr, 1, name, "octet", &[]);
        assert_eq!(packet[..4], [0, 3, 0, 1], "{name} is served");
        client.send_to(&[0, 5, 0, 0, 0], tid).unwrap();
    }
    // Write requests are refused unless allowed.
    let (packet, _) = request(&client, addr, 2, "new", "octet", &[]);
    assert_eq!(error_code(&packet), 2);
    assert!(!root.join("new").exists());
    let refused = server.daemon.wait_for_lines("access lines of refusals", 5, |l| {
        l.contains("access listener=tftp") && l.contains("result=access-violation")
    });
    assert!(refused.iter().all(|l| field(l, "bytes") == Some("0")), "{refused:#?}");
    server.daemon.wait_for_log("the refused write", |l| l.contains("result=write-refused"));
}

#[test]
fn lock_step_transfers_are_byte_exact_with_busy_polling_off_and_at_its_longest() {
    // The default (50 us) runs in every other test; these are the two ends of its range.
    for busy_poll in ["0s", "1ms"] {
        let server = Server::start(1, "", &format!("busy_poll = \"{busy_poll}\""), &FILES[..4]);
        for (name, _) in &FILES[..4] {
            let output = tftp_hpa(&server, "binary", name);
            assert!(output.status.success(), "busy_poll {busy_poll}, {name}: {output:?}");
            server.assert_same("tftp", name);
        }
    }
}

#[test]
fn a_client_that_stops_acknowledging_is_dropped_after_the_retries_and_its_count_released() {
    // One transfer per client at a time, across two workers; retransmit every 100 ms, twice.
    let server = Server::start(
        2,
        "max_connections_per_client = 1",
        "timeout = \"100ms\"\nretries = 2",
        &[("file", 4096)],
    );
    let addr = server.daemon.addr();
    let silent = raw_client();
    let (first, tid) = request(&silent, addr, 1, "file", "octet", &[]);
    assert_eq!(first[..4], [0, 3, 0, 1]);
    // A second transfer of the same client is refused while the first runs.
    let other = raw_client();
    let (refused, _) = request(&other, addr, 1, "file", "octet", &[]);
    assert_eq!(error_code(&refused), 0, "over max_connections_per_client");
    // The client acknowledges block 1, then falls silent: it gets block 2 twice more (it
    // answered once, so `retries` applies), then nothing: the transfer is over.
    silent.send_to(&[0, 4, 0, 1], tid).unwrap();
    let (second, _) = receive(&silent);
    assert_eq!(second[..4], [0, 3, 0, 2]);
    for _ in 0..2 {
        let (again, from) = receive(&silent);
        assert_eq!((&again[..4], from), (&[0, 3, 0, 2][..], tid), "a retransmission");
    }
    let line = server.daemon.wait_for_log("the abandoned transfer's access line", |l| {
        l.contains("access listener=tftp") && l.contains("result=timeout")
    });
    assert_eq!(field(&line, "retransmissions"), Some("2"), "{line}");
    // Its count was released: the same client may start a transfer again, and finish it.
    let (first, tid) = request(&other, addr, 1, "file", "octet", &[("blksize", "8192")]);
    assert_eq!(first[..2], [0, 6], "an OACK");
    other.send_to(&[0, 4, 0, 0], tid).unwrap();
    let (data, _) = receive(&other);
    assert_eq!(data[4..], server.served("file")[..], "one block of 4096 < 8192: the last");
    other.send_to(&[0, 4, 0, 1], tid).unwrap();
    server.daemon.wait_for_log("the completed transfer", |l| {
        l.contains("access listener=tftp") && l.contains("result=complete")
    });
}

#[test]
fn write_requests_create_new_files_only_within_the_size_limit() {
    let options = "allow_write = true\ncreate_mode = \"0600\"\nmax_write_size = 100000";
    let server = Server::start(1, "", options, &[("existing", 10)]);
    let root = server.root.path();
    let upload = random_bytes(70_000, 99);
    std::fs::write(server.out.path().join("upload"), &upload).unwrap();
    let port = server.port();
    let put = |remote: &str| {
        let args = ["-m", "binary", "127.0.0.1", &port, "-c", "put", "upload", remote];
        run("tftp", &args, server.out.path())
    };
    assert!(put("uploaded").status.success());
    server.daemon.wait_for_log("the upload's access line", |l| {
        l.contains("file=\"uploaded\"") && l.contains("result=complete")
    });
    assert_eq!(std::fs::read(root.join("uploaded")).unwrap(), upload);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("uploaded")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // An existing file is not replaced.
    let client = raw_client();
    let (packet, _) = request(&client, server.daemon.addr(), 2, "existing", "octet", &[]);
    assert_eq!(error_code(&packet), 6, "file exists");
    assert_eq!(std::fs::read(root.join("existing")).unwrap().len(), 10);
    // Over the limit: error 3 (announced size), and nothing is left behind.
    let (packet, _) =
        request(&client, server.daemon.addr(), 2, "huge", "octet", &[("tsize", "200000")]);
    assert_eq!(error_code(&packet), 3);
    assert!(!root.join("huge").exists());
}

#[test]
fn ipv6_clients_are_served_from_an_ipv6_tid() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("note: no IPv6 loopback here; nothing to test");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("file"), random_bytes(100_000, 6)).unwrap();
    let config = tftp_config(1, "", "")
        .replace("127.0.0.1:0", "[::1]:0")
        .replace("@ROOT@", root.path().to_str().unwrap());
    let daemon = Daemon::start(&config);
    let addr = daemon.addr();
    assert!(addr.is_ipv6(), "{addr}");
    let out = tempfile::tempdir().unwrap();
    let local = out.path().join("file");
    let url = format!("tftp://[::1]:{}/file", addr.port());
    let output = run(
        "curl",
        &["-sS", "--tftp-blksize", "1428", "-o", local.to_str().unwrap(), &url],
        out.path(),
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read(local).unwrap(), std::fs::read(root.path().join("file")).unwrap());
    let line = daemon.wait_for_log("the transfer's access line", |l| l.contains("result=complete"));
    assert!(field(&line, "peer").is_some_and(|p| p.starts_with("[::1]:")), "{line}");
}

/// Names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn an_abandoned_upload_leaves_no_file_and_the_name_can_be_uploaded_again() {
    let options = "allow_write = true\ntimeout = \"200ms\"\nretries = 2";
    let server = Server::start(1, "", options, &[]);
    let root = server.root.path();
    let addr = server.daemon.addr();
    // Two blocks of a longer file, then the client goes away (its port closes).
    let quitter = raw_client();
    let (ack, tid) = request(&quitter, addr, 2, "partial", "octet", &[]);
    assert_eq!(ack, [0, 4, 0, 0]);
    for block in 1..=2u8 {
        let data = [&[0, 3, 0, block][..], &[block; 512]].concat();
        quitter.send_to(&data, tid).unwrap();
        let (ack, _) = receive(&quitter);
        assert_eq!(ack, [0, 4, 0, block]);
        assert!(entries(root).is_empty(), "nothing under root mid-upload: {:?}", entries(root));
    }
    drop(quitter);
    let line = server.daemon.wait_for_log("the abandoned upload's access line", |l| {
        l.contains("file=\"partial\"") && l.contains("result=")
    });
    assert!(!line.contains("result=complete"), "{line}");
    assert_eq!(field(&line, "bytes"), Some("1024"), "{line}");
    assert!(entries(root).is_empty(), "no partial file: {:?}", entries(root));
    // The name is free: a real client uploads it.
    let upload = random_bytes(3000, 7);
    std::fs::write(server.out.path().join("upload"), &upload).unwrap();
    let port = server.port();
    let args = ["-m", "binary", "127.0.0.1", &port, "-c", "put", "upload", "partial"];
    let output = run("tftp", &args, server.out.path());
    assert!(output.status.success(), "{output:?}");
    server.daemon.wait_for_log("the new upload's access line", |l| {
        l.contains("file=\"partial\"") && l.contains("result=complete")
    });
    assert_eq!(std::fs::read(root.join("partial")).unwrap(), upload);
    assert_eq!(entries(root), ["partial"]);
}

/// The receive queue (bytes) and the drop count of the UDP socket bound to `addr`, from
/// /proc/net/udp (proc(5)).
fn udp_socket_queue(addr: SocketAddr) -> (u64, u64) {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only: {addr}") };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .unwrap_or_else(|| panic!("no socket {local} in /proc/net/udp"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    let rx_queue = fields[4].split(':').nth(1).unwrap();
    let rx_queue = u64::from_str_radix(rx_queue, 16).unwrap();
    (rx_queue, fields[12].parse().unwrap())
}

/// Sums field `key` over the datagram summary lines of the tftp listener.
fn summed(daemon: &Daemon, key: &str) -> u64 {
    daemon
        .matching(|l| l.contains("datagrams listener=tftp"))
        .iter()
        .map(|l| field(l, key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        .sum()
}

#[test]
fn spoofed_read_requests_from_many_addresses_draw_less_than_ten_times_their_size() {
    // The issue's flood: 20 read requests of 11 bytes from each of 50 addresses that never
    // answer (sockets that stay open and silent, as a victim's would).
    const ADDRESSES: u8 = 50;
    const ROUNDS: usize = 20;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ab"), random_bytes(64 << 10, 3)).unwrap();
    // A heartbeat every second: the workers' summary lines come out soon after the flood.
    let config = tftp_config(2, "", "")
        .replace("[daemon]\n", "[daemon]\nworker_timeout = \"3s\"\n")
        .replace("@ROOT@", root.path().to_str().unwrap());
    let daemon = Daemon::start(&config);
    let addr = daemon.addr();
    let victims: Vec<UdpSocket> = (0..ADDRESSES)
        .map(|i| {
            let socket = UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 7, 10 + i), 0)).unwrap();
            socket.set_nonblocking(true).unwrap();
            socket
        })
        .collect();
    let request = b"\x00\x01ab\x00octet\x00";
    assert_eq!(request.len(), 11);
    // A round from every address, then the next once the workers have read it all, so the
    // listener's receive buffer never overflows: every request is one the service saw.
    for _ in 0..ROUNDS {
        for victim in &victims {
            victim.send_to(request, addr).unwrap();
        }
        eventually("the round read", || udp_socket_queue(addr).0 == 0);
    }
    assert_eq!(udp_socket_queue(addr).1, 0, "no request dropped by the kernel");
    let sent = (ADDRESSES as usize * ROUNDS * request.len()) as u64;
    // Every request reached a worker (the summary lines say so), and every transfer started
    // has ended (one access line each): nothing more will be sent.
    eventually("every request received", || summed(&daemon, "received") >= 1000);
    assert_eq!(summed(&daemon, "in"), sent);
    let flows = summed(&daemon, "flows") as usize;
    daemon.wait_for_lines("every transfer's access line", flows, |l| {
        l.contains("access listener=tftp peer=")
    });
    let mut drawn = 0u64;
    let mut buffer = [0u8; 2048];
    for victim in &victims {
        while let Ok(n) = victim.recv(&mut buffer) {
            drawn += n as u64;
        }
    }
    let factor = drawn as f64 / sent as f64;
    eprintln!("{sent} B of requests drew {drawn} B: {factor:.2}x ({flows} transfers)");
    assert!(factor < 10.0, "{sent} B of requests drew {drawn} B: {factor:.1}x");
    let unverified = summed(&daemon, "unverified");
    assert!(unverified > 0, "the budget dropped requests");
    let warning = daemon
        .wait_for_log("the budget's warning", |l| l.contains("max_unverified_transfers (32)"));
    assert!(warning.contains("dropped"), "{warning}");
}

#[test]
fn a_client_that_loses_the_first_data_block_still_completes() {
    let server = Server::start(1, "", "timeout = \"200ms\"", &[("file", 1300)]);
    let client = raw_client();
    let (first, tid) = request(&client, server.daemon.addr(), 1, "file", "octet", &[]);
    assert_eq!(first[..4], [0, 3, 0, 1], "DATA 1, lost on the way (not acknowledged)");
    let (again, _) = receive(&client);
    assert_eq!(again, first, "sent again to a client that has not answered yet");
    let mut got = again[4..].to_vec();
    client.send_to(&[0, 4, 0, 1], tid).unwrap();
    // Answered once: block 2 is lost twice and still comes (the full `retries`).
    let (second, _) = receive(&client);
    for _ in 0..2 {
        assert_eq!(receive(&client).0, second, "a retransmission");
    }
    got.extend_from_slice(&second[4..]);
    client.send_to(&[0, 4, 0, 2], tid).unwrap();
    let (last, _) = receive(&client);
    assert_eq!(last[..4], [0, 3, 0, 3]);
    got.extend_from_slice(&last[4..]);
    client.send_to(&[0, 4, 0, 3], tid).unwrap();
    assert_eq!(got, server.served("file"));
    let line = server.daemon.wait_for_log("the transfer's access line", |l| {
        l.contains("file=\"file\"") && l.contains("result=")
    });
    assert_eq!(field(&line, "result"), Some("complete"), "{line}");
    assert_eq!(field(&line, "retransmissions"), Some("3"), "{line}");
}

#[test]
fn the_bounds_for_unverified_peers_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preforkd.toml");
    let check = |options: &str| {
        let config = tftp_config(1, "", options).replace("@ROOT@", "/srv/tftp");
        std::fs::write(&path, config).unwrap();
        run_cli(&["check", "-c", path.to_str().unwrap()])
    };
    let (status, stdout, stderr) = check("unverified_retries = 0\nmax_unverified_transfers = 0");
    assert!(status.success(), "0 and 0 are valid: {stdout}{stderr}");
    let (status, _, stderr) = check("unverified_retries = 101\nmax_unverified_transfers = 4097");
    assert!(!status.success());
    assert!(stderr.contains("options.unverified_retries: 101 is out of range"), "{stderr}");
    assert!(stderr.contains("options.max_unverified_transfers: 4097 is out of range"), "{stderr}");
}

#[test]
fn udp_and_tftp_traffic_reach_the_listener_counters() {
    // Issue 22, item 8: the scoreboard's per-listener counters (status --json, the metrics)
    // count datagrams by outcome, their bytes, and each transfer as a connection; requests
    // the budget of unverified transfers drops are counted, not only logged.
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("file"), random_bytes(1300, 5)).unwrap();
    let config = format!(
        "{}[[listener]]\nname = \"echo-udp\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\ntransport = \"udp\"\nmax_datagram_rate_per_client = \"3/h\"\n\
         [[listener]]\nname = \"metrics\"\naddress = \"127.0.0.1:0\"\nservice = \"metrics\"\n",
        tftp_config(1, "", "max_unverified_transfers = 2")
            .replace("[daemon]\n", "[daemon]\npid_file = \"@DIR@/preforkd.pid\"\n")
            .replace("@ROOT@", root.path().to_str().unwrap())
    );
    let daemon = Daemon::start(&config);
    let [tftp, echo, metrics] = daemon.addrs[..] else { panic!("3 listeners") };
    let listener = |document: &serde_json::Value, name: &str| {
        let listeners = document["listeners"].as_array().expect("listeners");
        listeners.iter().find(|l| l["name"] == name).cloned().expect(name)
    };

    // Echo: 5 datagrams of 10 bytes from one client at 3 per hour: 3 answered, 2 over it.
    let client = raw_client();
    for i in 0..5u8 {
        client.send_to(&[i; 10], echo).unwrap();
    }
    for _ in 0..3 {
        assert_eq!(receive(&client).0.len(), 10);
    }
    // A real client downloads a file: one transfer.
    let out = tempfile::tempdir().unwrap();
    let local = out.path().join("file");
    let url = format!("tftp://127.0.0.1:{}/file", tftp.port());
    let output = run("curl", &["-sS", "-o", local.to_str().unwrap(), &url], out.path());
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read(&local).unwrap().len(), 1300);
    // Four requests from addresses that never answer: two take the budget of unverified
    // transfers, the other two are dropped unanswered.
    let silent: Vec<UdpSocket> = (0..4)
        .map(|i| UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 8, 10 + i), 0)).unwrap())
        .collect();
    for socket in &silent {
        socket.send_to(b"\x00\x01file\x00octet\x00", tftp).unwrap();
    }
    let mut document = serde_json::Value::Null;
    eventually("the counters are published", || {
        document = crate::status::status_json(&daemon);
        let (echo, tftp) = (listener(&document, "echo-udp"), listener(&document, "tftp"));
        echo["datagrams"]["over-rate"] == 2
            && tftp["datagrams"]["unverified"] == 2
            && tftp["closed"]["service"] == 1
    });
    let (echo, tftp) = (listener(&document, "echo-udp"), listener(&document, "tftp"));
    eprintln!("status --json: echo-udp {echo}\ntftp {tftp}");
    assert_eq!(echo["datagrams"]["answered"], 3);
    assert_eq!((echo["bytes_in"].as_u64(), echo["bytes_out"].as_u64()), (Some(50), Some(30)));
    assert_eq!((echo["accepted"].as_u64(), echo["open"].as_u64()), (Some(0), Some(0)));
    // Three transfers started (one served, two waiting for a silent peer), two dropped.
    assert_eq!(tftp["datagrams"]["flow"], 3);
    assert_eq!(tftp["accepted"], 3);
    assert_eq!(tftp["open"], 2, "the two silent transfers run until they give up");
    assert!(tftp["bytes_out"].as_u64().unwrap() >= 1300, "{tftp}");
    for outcome in ["answered", "ignored", "over-rate", "flow-refused"] {
        assert_eq!(tftp["datagrams"][outcome], 0, "{outcome}");
    }
    // The metrics are read from the same rows.
    let metrics = crate::metrics::scrape(metrics);
    for sample in [
        "preforkd_listener_datagrams_total{listener=\"tftp\",outcome=\"unverified\"} 2",
        "preforkd_listener_datagrams_total{listener=\"echo-udp\",outcome=\"over-rate\"} 2",
        "preforkd_listener_accepted_connections_total{listener=\"tftp\"} 3",
    ] {
        assert!(metrics.contains(sample), "{sample} missing from\n{metrics}");
    }
}
