//! Unix-domain listeners and backends, with real clients: socat, redis-cli against a
//! redis-server on a Unix socket, and setpriv for a client of another user.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;

/// A daemon with `workers` workers and the given listeners, each `(name, address, service,
/// extra lines)`, started without [`Daemon::wait_ready`] (which learns TCP ports): waits
/// until its workers serve.
fn unix_daemon(workers: usize, listeners: &[(&str, &str, &str, &str)]) -> Daemon {
    let mut config = format!(
        "[daemon]\nworkers = {workers}\nallow_root_workers = true\ngraceful_timeout = \"10s\"\n\
         pid_file = \"@DIR@/preforkd.pid\"\n[log]\nlevel = \"debug\"\naccess_log = true\n"
    );
    for (name, address, service, extra) in listeners {
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"{address}\"\nservice = \"{service}\"\n{extra}\n"
        ));
    }
    let daemon = Daemon::spawn(&[], &config, None, &[]);
    daemon.wait_until("the workers serve", Status::serving);
    daemon
}

/// Lets other users reach the daemon's directory (for a socket file they may open).
fn open_dir(daemon: &Daemon) {
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A client connection to the socket file `path`, with timeouts.
fn unix_connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).expect("connect to the socket file");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Sends `message` and reads as many bytes back; whether they are the same.
fn echoes(stream: &mut UnixStream, message: &[u8]) -> bool {
    if stream.write_all(message).is_err() {
        return false;
    }
    let mut got = vec![0; message.len()];
    stream.read_exact(&mut got).is_ok() && got == message
}

/// Runs `program` with `args`, `input` on its standard input; its standard output.
fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn socat_unix(path: &Path, input: &[u8]) -> String {
    let target = format!("UNIX-CONNECT:{}", path.display());
    run_with_input("socat", &["-t", "5", "-", &target], input)
}

fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("{test}: skipped: needs root (socket file owners, setpriv to another uid)");
    }
    root
}

#[test]
fn echo_and_exec_serve_unix_sockets_with_the_file_mode_owner_and_client_credentials() {
    let abstract_name = format!("preforkd-test-echo-{}", std::process::id());
    let owner = if nix::unistd::geteuid().is_root() { "owner = \"65534\"\n" } else { "" };
    let daemon = unix_daemon(
        2,
        &[
            ("echo", "unix:@DIR@/echo.sock", "echo", &format!("mode = \"0640\"\n{owner}")),
            ("hidden", &format!("unix:@{abstract_name}"), "echo", ""),
            (
                "env",
                "unix:@DIR@/env.sock",
                "exec",
                "[listener.options]\nuser = \"nobody\"\nprogram = \"/usr/bin/env\"",
            ),
        ],
    );
    let echo = daemon.dir().join("echo.sock");
    let meta = std::fs::symlink_metadata(&echo).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "mode as configured");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(meta.uid(), 65534, "owner as configured");
    }
    assert_eq!(socat_unix(&echo, b"hello over unix\n"), "hello over unix\n");
    let target = format!("ABSTRACT-CONNECT:{abstract_name}");
    let answer = run_with_input("socat", &["-t", "5", "-", &target], b"abstract\n");
    assert_eq!(answer, "abstract\n", "the abstract name is reached by its name alone");

    let env = socat_unix(&daemon.dir().join("env.sock"), b"");
    let vars: Vec<&str> = env.lines().collect();
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    assert!(vars.contains(&"PROTO=UNIX"), "{env}");
    assert!(vars.contains(&format!("UNIXREMOTEEUID={uid}").as_str()), "{env}");
    assert!(vars.contains(&format!("UNIXREMOTEEGID={gid}").as_str()), "{env}");
    let local = format!("UNIXLOCALPATH={}", daemon.dir().join("env.sock").display());
    assert!(vars.contains(&local.as_str()), "{env}");
    let pid = vars.iter().find_map(|v| v.strip_prefix("UNIXREMOTEPID=")).expect("a pid");
    assert!(pid.parse::<i32>().unwrap() > 0, "{env}");
    assert!(!env.contains("TCPREMOTEIP"), "{env}");

    let line = daemon.wait_for_log("the echo access line", |l| l.contains("access listener=echo "));
    let peer = field(&line, "peer").unwrap();
    assert!(peer.starts_with(&format!("uid:{uid},pid:")), "{line}");
}

#[test]
fn the_per_client_limit_counts_a_unix_client_by_its_user_id() {
    if !root_or_skip("the_per_client_limit_counts_a_unix_client_by_its_user_id") {
        return;
    }
    let daemon = unix_daemon(
        2,
        &[(
            "echo",
            "unix:@DIR@/echo.sock",
            "echo",
            "mode = \"0666\"\nmax_connections_per_client = 2",
        )],
    );
    open_dir(&daemon);
    let path = daemon.dir().join("echo.sock");
    let mut first = unix_connect(&path);
    let mut second = unix_connect(&path);
    assert!(echoes(&mut first, b"1") && echoes(&mut second, b"2"));
    let mut third = unix_connect(&path);
    let mut byte = [0u8; 1];
    assert_eq!(third.read(&mut byte).unwrap_or(0), 0, "root's third connection is refused");
    // Another user is another client: served while root holds its two.
    let target = format!("UNIX-CONNECT:{}", path.display());
    let nobody = run_with_input(
        "setpriv",
        &["--reuid=65534", "--regid=65534", "--clear-groups", "socat", "-t", "5", "-", &target],
        b"from nobody\n",
    );
    assert_eq!(nobody, "from nobody\n");
    let refusal =
        daemon.wait_for_log("the refusal", |l| l.contains("refused a connection from uid:0"));
    assert!(refusal.contains("(limit)"), "{refusal}");
    let served = daemon.wait_for_log("nobody's access line", |l| l.contains("peer=uid:65534,"));
    assert_eq!(field(&served, "reason"), Some("client-close"), "{served}");
    assert!(echoes(&mut first, b"still"), "the first two stay served");
}

/// A redis-server on a Unix socket of its own (no TCP port), stopped (by pid) on drop.
struct Redis {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm", "700"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        let redis = Redis { child, socket, _dir: dir };
        let deadline = Instant::now() + PATIENCE;
        while UnixStream::connect(&redis.socket).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_cli(socket: &Path, args: &[&str]) -> String {
    let output =
        Command::new("redis-cli").arg("-s").arg(socket).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn redis_cli_reaches_a_unix_socket_redis_through_a_unix_relay() {
    let redis = Redis::start();
    let backend = format!("unix:{}", redis.socket.display());
    let options = format!("[listener.options]\nbackends = [\"{backend}\"]");
    let daemon = unix_daemon(2, &[("redis", "unix:@DIR@/front.sock", "relay", &options)]);
    let front = daemon.dir().join("front.sock");
    assert_eq!(redis_cli(&front, &["PING"]), "PONG");
    assert_eq!(redis_cli(&front, &["SET", "relayed", "over unix"]), "OK");
    assert_eq!(redis_cli(&redis.socket, &["GET", "relayed"]), "over unix", "it reached redis");
    assert_eq!(redis_cli(&front, &["GET", "relayed"]), "over unix");
    let line = daemon.wait_for_log("the relay's access line", |l| {
        l.contains("access listener=redis ") && l.contains("backend=unix:")
    });
    assert_eq!(field(&line, "backend"), Some(backend.as_str()), "{line}");
}

#[test]
fn reload_and_upgrade_keep_a_unix_socket_file_and_its_connections() {
    let mut daemon = unix_daemon(2, &[("echo", "unix:@DIR@/echo.sock", "echo", "mode = \"0600\"")]);
    let path = daemon.dir().join("echo.sock");
    let inode = || std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
    let first = inode().expect("the socket file");
    let mut kept = unix_connect(&path);
    assert!(echoes(&mut kept, b"before"));

    let config = std::fs::read_to_string(&daemon.config_path).unwrap();
    std::fs::write(&daemon.config_path, config.replace("0600", "0660")).unwrap();
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    daemon.wait_generation(2);
    assert_eq!(inode(), Some(first), "a reload keeps the socket file");
    let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "and applies its new mode");
    assert!(echoes(&mut kept, b"after the reload"), "the connection lives on");
    assert!(echoes(&mut unix_connect(&path), b"new"), "new clients are served");

    let old = daemon.pid();
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    let new = new_master_pid(&stdout);
    daemon.signal(Signal::SIGWINCH);
    daemon.wait_until_old_master("the old workers stop", |s| {
        s.master.pid == old.as_raw() && s.ready(s.master.generation).is_empty()
    });
    daemon.signal(Signal::SIGQUIT);
    daemon.wait_master_exit(PATIENCE).expect("the old master exits");
    assert_eq!(inode(), Some(first), "the old master leaves the file to the new one");
    assert!(echoes(&mut kept, b"after the upgrade"), "the connection moved to the new master");
    assert!(echoes(&mut unix_connect(&path), b"new master"));
    let (_, status, _) = daemon.control("status");
    assert!(status.starts_with(&format!("master pid {new},")), "{status}");
    drop(kept);
    let (status, _, stderr) = daemon.control("stop");
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(inode(), None, "the last master removes its socket file");
}

#[test]
fn socket_activation_passes_a_unix_socket_which_preforkd_leaves_to_systemd() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("activated.sock");
    let listen = path.to_str().unwrap();
    let config = format!(
        "[daemon]\nworkers = 1\nallow_root_workers = true\npid_file = \"@DIR@/preforkd.pid\"\n\
         [[listener]]\nname = \"echo\"\naddress = \"unix:{listen}\"\nservice = \"echo\"\n"
    );
    // Matched by its address: no --fdname.
    let daemon = Daemon::spawn(&["systemd-socket-activate", "-l", listen], &config, None, &[]);
    daemon.wait_for_log("systemd-socket-activate listens", |l| l.contains("Listening on"));
    // The wrapper starts the daemon on the first connection, which waits in the backlog.
    let mut first = unix_connect(&path);
    first.write_all(b"first").unwrap();
    daemon.wait_until("the worker serves", Status::serving);
    let line = daemon.wait_for_log("adoption", |l| l.contains("listening on unix:"));
    assert!(line.contains("(passed by systemd)"), "{line}");
    let mut got = [0u8; 5];
    first.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"first");
    let (status, _, stderr) = daemon.control("stop");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(path.exists(), "systemd's socket file is systemd's to remove");
}

#[test]
fn check_refuses_what_a_unix_listener_cannot_have() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"a\"\naddress = \"unix:relative.sock\"\nservice = \"echo\"\n\
         [[listener]]\nname = \"b\"\naddress = \"unix:/tmp/b.sock\"\nservice = \"echo\"\n\
         allow = [\"10.0.0.0/8\"]\ntransport = \"udp\"\nreuseport = true\n\
         [[listener]]\nname = \"c\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\nmode = \"0600\"\n\
         [[listener]]\nname = \"d\"\naddress = \"unix:/tmp/d.sock\"\nservice = \"echo\"\nmode = \"rw\"\n",
    )
    .unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stdout}{stderr}");
    for expected in [
        "listener[0].address: \"unix:relative.sock\": a Unix socket path must be absolute",
        "listener[1].allow: names IP prefixes, which a Unix listener has none of",
        "listener[1].transport: unix:/tmp/b.sock is a stream socket",
        "listener[1].reuseport: names SO_REUSEPORT",
        "listener[2].mode: applies to a unix:/path listener only",
        "listener[3].mode: \"rw\" is not a file mode",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn status_json_names_a_unix_listeners_path_and_abstract_name() {
    let abstract_name = format!("preforkd-status-{}", std::process::id());
    let daemon = unix_daemon(
        1,
        &[
            ("file", "unix:@DIR@/echo.sock", "echo", ""),
            ("hidden", &format!("unix:@{abstract_name}"), "echo", ""),
            ("tcp", "127.0.0.1:0", "echo", ""),
        ],
    );
    // Published before the workers were forked, so there by the time they serve.
    let status = daemon.status().expect("the master answers");
    let addresses: Vec<(&str, Option<&str>)> =
        status.listeners.iter().map(|l| (l.name.as_str(), l.address.as_deref())).collect();
    let file = format!("unix:{}", daemon.dir().join("echo.sock").display());
    let hidden = format!("unix:@{abstract_name}");
    assert_eq!(addresses[..2], [("file", Some(file.as_str())), ("hidden", Some(hidden.as_str()))]);
    let tcp = status.address("tcp").expect("an IP address with its port");
    assert_ne!(tcp.port(), 0);
    // The path is the one clients reach.
    let mut stream = unix_connect(&daemon.dir().join("echo.sock"));
    assert!(echoes(&mut stream, b"where?"), "the published path serves");
}
