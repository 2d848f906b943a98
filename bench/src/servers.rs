//! The servers under test, each started on loopback in its own process group and stopped by
//! its pid; CPU time and memory are read from /proc for the whole group.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A server to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// preforkd with this event backend.
    Preforkd(&'static str),
    /// preforkd's `exec` service running `/bin/cat` (a process per connection), epoll.
    PreforkdExec,
    /// xinetd's internal echo service.
    Xinetd,
    /// xinetd running `cat` (a process per connection).
    XinetdCat,
    /// ucspi-tcp's tcpserver running `cat` (a process per connection).
    Tcpserver,
    /// socat in fork mode with PIPE (a process per connection).
    Socat,
    /// The reference tokio echo server (bench/src/bin/tokio-echo.rs).
    Tokio,
    /// preforkd's relay (epoll) in front of [`PreforkdOptions::backend`], with its splice(2)
    /// pump (`splice = true`) or its read/write pump (`splice = false`).
    PreforkdRelay {
        /// The `splice` option.
        splice: bool,
    },
    /// preforkd's relay (read/write) with an active health check (every second) and two
    /// weighted backend entries (3:1) that are the same backend, by its IPv4 and its
    /// IPv4-mapped IPv6 address: the cost of the checks and of weighted selection.
    PreforkdRelayChecked,
    /// preforkd's relay (read/write) to the same echo server on a Unix-domain socket
    /// ([`unix_backend`]).
    PreforkdRelayUnix,
    /// HAProxy, `mode tcp`, `nbthread` = workers, in front of the backend.
    Haproxy,
    /// nginx's stream module, `proxy_pass`, `worker_processes` = workers.
    NginxStream,
    /// preforkd's echo (epoll) behind its `[listener.tls]`.
    PreforkdTls,
    /// preforkd's relay (epoll) behind its `[listener.tls]`, in front of the backend.
    PreforkdTlsRelay,
    /// preforkd's relay (epoll) routing by the ClientHello's server name (a `route` for
    /// `localhost`), in front of a TLS backend that terminates: nothing decrypted.
    PreforkdSniRelay,
    /// preforkd's relay (epoll) behind its `[listener.tls]` with `backend_tls` to a TLS
    /// backend: terminated and encrypted again.
    PreforkdTlsReencrypt,
    /// HAProxy, `bind ... ssl crt`, `mode tcp`, `nbthread` = workers, in front of the backend.
    HaproxyTls,
    /// nginx's stream module with `listen ... ssl`, `worker_processes` = workers, in front of
    /// the backend.
    NginxTls,
    /// stunnel4 (a thread per connection) in front of the backend.
    Stunnel,
    /// The same preforkd scenario run by the binary [`before_binary`] names (an earlier
    /// build, so that before and after are measured in one run, taking turns).
    Before(&'static Kind),
}

/// The earlier preforkd binary that `PREFORKD_BENCH_BEFORE` names, if it is set and is a
/// file: its rows are labelled `[before]`.
pub fn before_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("PREFORKD_BENCH_BEFORE")?);
    path.is_file().then_some(path)
}

/// For each of `kinds` that the earlier binary can run (plain echo and relay: their
/// configurations use only keys it knows), a [`Kind::Before`] row, when
/// `PREFORKD_BENCH_BEFORE` is set.
pub fn with_before(kinds: Vec<Kind>) -> Vec<Kind> {
    if before_binary().is_none() {
        return kinds;
    }
    let mut all = Vec::with_capacity(kinds.len() * 2);
    for kind in kinds {
        all.push(kind);
        if matches!(kind, Kind::Preforkd(_) | Kind::PreforkdRelay { .. }) {
            all.push(Kind::Before(Box::leak(Box::new(kind))));
        }
    }
    all
}

impl Kind {
    /// Column label.
    pub fn label(self) -> String {
        match self {
            Kind::Preforkd(backend) => format!("preforkd ({backend})"),
            Kind::PreforkdExec => "preforkd exec + cat".into(),
            Kind::Xinetd => "xinetd (internal echo)".into(),
            Kind::XinetdCat => "xinetd + cat".into(),
            Kind::Tcpserver => "tcpserver + cat".into(),
            Kind::Socat => "socat fork".into(),
            Kind::Tokio => "tokio (reference)".into(),
            Kind::PreforkdRelay { splice: true } => "preforkd relay (splice)".into(),
            Kind::PreforkdRelay { splice: false } => "preforkd relay (read/write)".into(),
            Kind::PreforkdRelayChecked => "preforkd relay (checks, weights)".into(),
            Kind::PreforkdRelayUnix => "preforkd relay (unix backend)".into(),
            Kind::Haproxy => "HAProxy (mode tcp)".into(),
            Kind::NginxStream => "nginx stream".into(),
            Kind::PreforkdTls => "preforkd echo + tls".into(),
            Kind::PreforkdTlsRelay => "preforkd relay + tls".into(),
            Kind::PreforkdSniRelay => "preforkd relay, SNI route".into(),
            Kind::PreforkdTlsReencrypt => "preforkd relay + tls + backend_tls".into(),
            Kind::HaproxyTls => "HAProxy 2.6 ssl".into(),
            Kind::NginxTls => "nginx 1.22 stream ssl".into(),
            Kind::Stunnel => "stunnel4".into(),
            Kind::Before(kind) => format!("{} [before]", kind.label()),
        }
    }
}

/// How to run preforkd for a scenario.
#[derive(Debug, Clone)]
pub struct PreforkdOptions {
    /// Worker processes.
    pub workers: usize,
    /// `max_connections_per_client` (0: unlimited).
    pub per_client: u32,
    /// For the proxies: the backend they relay to.
    pub backend: Option<SocketAddr>,
    /// For the TLS servers: the directory with `chain.pem`, `key.pem` and `combined.pem`
    /// (both, for HAProxy).
    pub tls: Option<PathBuf>,
    /// For preforkd: log at debug level to this file (default: warnings, to stderr).
    pub log: Option<PathBuf>,
}

impl PreforkdOptions {
    /// The `[log]` section for these options.
    fn log_section(&self) -> String {
        match &self.log {
            Some(path) => format!(
                "[log]\nlevel = \"debug\"\naccess_log = false\ntarget = \"file\"\npath = \"{}\"\n",
                path.display()
            ),
            None => "[log]\nlevel = \"warn\"\naccess_log = false\n".into(),
        }
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The preforkd release binary.
    pub preforkd: PathBuf,
    /// The tokio reference binary.
    pub tokio: PathBuf,
}

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    /// For preforkd: its configuration (status needs it).
    pub config: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// The Unix socket the relay scenario's echo backend also listens on, for the backend on
/// `port` (the tokio echo server, started a second time with `unix:PATH`).
pub fn unix_backend(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("preforkd-bench-echo-{port}.sock"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
}

impl Server {
    /// Starts `kind` on a free loopback port and waits until it accepts connections.
    pub fn start(
        kind: Kind,
        binaries: &Binaries,
        options: &PreforkdOptions,
    ) -> std::io::Result<Server> {
        if let Kind::Before(kind) = kind {
            let preforkd = before_binary()
                .ok_or_else(|| std::io::Error::other("PREFORKD_BENCH_BEFORE is not a file"))?;
            return Server::start(*kind, &Binaries { preforkd, ..binaries.clone() }, options);
        }
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut config = None;
        let mut command = match kind {
            Kind::Preforkd(_) | Kind::PreforkdExec => {
                let (variant, service) = match kind {
                    Kind::Preforkd(variant) => (variant, "echo"),
                    _ => ("epoll", "exec"),
                };
                let (backend, reuseport) = match variant.strip_suffix(" + reuseport") {
                    Some(backend) => (backend, true),
                    None => (variant, false),
                };
                let max = if backend == "select" { 1000 } else { 30000 };
                let text = format!(
                    "[daemon]\nworkers = {}\nevent_backend = \"{backend}\"\nmax_connections_per_worker = {max}\n\
                     rlimit_nofile = 65536\nallow_root_workers = true\npid_file = \"{}\"\n\
                     [log]\nlevel = \"warn\"\naccess_log = false\n\
                     [[listener]]\nname = \"echo\"\naddress = \"{addr}\"\nservice = \"{service}\"\nbacklog = 4096\n\
                     short_idle_timeout = \"5m\"\nlong_idle_timeout = \"5m\"\n\
                     max_connections_per_client = {}\nmax_long_connections_per_client = 0\nreuseport = {reuseport}\n{}",
                    options.workers,
                    dir.path().join("preforkd.pid").display(),
                    options.per_client,
                    if service == "exec" {
                        "[listener.options]\nprogram = \"/bin/cat\"\nstderr = \"discard\"\nuser = \"nobody\"\n"
                    } else {
                        ""
                    },
                );
                let path = dir.path().join("preforkd.toml");
                std::fs::write(&path, text)?;
                let mut command = Command::new(&binaries.preforkd);
                command.arg("-c").arg(&path);
                config = Some(path);
                command
            }
            Kind::Xinetd | Kind::XinetdCat => {
                // No libwrap and no logging: no name lookups; no rate limit (cps).
                let program = if kind == Kind::Xinetd {
                    " type = INTERNAL UNLISTED\n id = echo-stream\n"
                } else {
                    " type = UNLISTED\n server = /bin/cat\n"
                };
                let path = dir.path().join("xinetd.conf");
                std::fs::write(
                    &path,
                    format!(
                        "defaults\n{{\n log_type = FILE /dev/null\n log_on_success =\n log_on_failure =\n}}\n\
                         service echo\n{{\n{program} socket_type = stream\n protocol = tcp\n wait = no\n user = root\n\
                         bind = 127.0.0.1\n port = {port}\n flags = REUSE NOLIBWRAP\n cps = 100000 1\n\
                         instances = UNLIMITED\n per_source = UNLIMITED\n}}\n"
                    ),
                )?;
                let mut command = Command::new("xinetd");
                command
                    .args(["-dontfork", "-pidfile"])
                    .arg(dir.path().join("xinetd.pid"))
                    .arg("-f")
                    .arg(&path);
                command
            }
            Kind::Tcpserver => {
                let mut command = Command::new("tcpserver");
                command.args([
                    "-q",
                    "-H",
                    "-R",
                    "-l",
                    "0",
                    "-c",
                    "20000",
                    "-b",
                    "1024",
                    "127.0.0.1",
                    &port.to_string(),
                    "cat",
                ]);
                command
            }
            Kind::Socat => {
                let mut command = Command::new("socat");
                command
                    .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"))
                    .arg("PIPE");
                command
            }
            Kind::Tokio => {
                let mut command = Command::new(&binaries.tokio);
                command.arg(addr.to_string());
                command
            }
            Kind::PreforkdRelay { .. } | Kind::PreforkdRelayChecked | Kind::PreforkdRelayUnix => {
                let backend = options.backend.ok_or_else(|| std::io::Error::other("no backend"))?;
                let port = backend.port();
                let (splice, backends) = match kind {
                    Kind::PreforkdRelay { splice } => (splice, format!("[\"{backend}\"]")),
                    Kind::PreforkdRelayChecked => (
                        false,
                        format!(
                            "[{{ address = \"127.0.0.1:{port}\", weight = 3 }}, \
                             {{ address = \"[::ffff:127.0.0.1]:{port}\", weight = 1 }}]\n\
                             health_check = {{ interval = \"1s\" }}"
                        ),
                    ),
                    _ => (false, format!("[\"unix:{}\"]", unix_backend(port).display())),
                };
                let text = format!(
                    "[daemon]\nworkers = {}\nevent_backend = \"epoll\"\nmax_connections_per_worker = 30000\n\
                     rlimit_nofile = 65536\nallow_root_workers = true\npid_file = \"{}\"\n{}\
                     [[listener]]\nname = \"relay\"\naddress = \"{addr}\"\nservice = \"relay\"\nbacklog = 4096\n\
                     short_idle_timeout = \"5m\"\nlong_idle_timeout = \"5m\"\n\
                     max_connections_per_client = {}\nmax_long_connections_per_client = 0\n\
                     [listener.options]\nbackends = {backends}\nsplice = {splice}\n",
                    options.workers,
                    dir.path().join("preforkd.pid").display(),
                    options.log_section(),
                    options.per_client
                );
                let path = dir.path().join("preforkd.toml");
                std::fs::write(&path, text)?;
                let mut command = Command::new(&binaries.preforkd);
                command.arg("-c").arg(&path);
                config = Some(path);
                command
            }
            Kind::PreforkdTls
            | Kind::PreforkdTlsRelay
            | Kind::PreforkdSniRelay
            | Kind::PreforkdTlsReencrypt => {
                let tls =
                    options.tls.as_ref().ok_or_else(|| std::io::Error::other("no certificate"))?;
                let (service, extra) = match (kind, options.backend) {
                    (Kind::PreforkdTls, _) => ("echo", String::new()),
                    (Kind::PreforkdSniRelay, Some(backend)) => (
                        "relay",
                        format!(
                            "[listener.options]\n[[listener.options.route]]\n\
                             server_names = [\"localhost\"]\nbackends = [\"{backend}\"]\n"
                        ),
                    ),
                    (Kind::PreforkdTlsReencrypt, Some(backend)) => (
                        "relay",
                        format!(
                            "[listener.options]\nbackends = [\"{backend}\"]\n\
                             backend_tls = {{ server_name = \"localhost\", ca = \"{}\" }}\n",
                            tls.join("ca.pem").display()
                        ),
                    ),
                    (_, Some(backend)) => {
                        ("relay", format!("[listener.options]\nbackends = [\"{backend}\"]\n"))
                    }
                    (_, None) => return Err(std::io::Error::other("no backend")),
                };
                // A relay that routes by the ClientHello terminates nothing itself.
                let terminates = kind != Kind::PreforkdSniRelay;
                let text = format!(
                    "[daemon]\nworkers = {}\nevent_backend = \"epoll\"\nmax_connections_per_worker = 30000\n\
                     rlimit_nofile = 65536\nallow_root_workers = true\npid_file = \"{}\"\n\
                     [log]\nlevel = \"warn\"\naccess_log = false\n\
                     [[listener]]\nname = \"tls\"\naddress = \"{addr}\"\nservice = \"{service}\"\nbacklog = 4096\n\
                     short_idle_timeout = \"5m\"\nlong_idle_timeout = \"5m\"\n\
                     max_connections_per_client = 0\nmax_long_connections_per_client = 0\n{extra}{}",
                    options.workers,
                    dir.path().join("preforkd.pid").display(),
                    if terminates {
                        format!(
                            "[listener.tls]\ncertificate = \"{}\"\nkey = \"{}\"\nmin_version = \"1.3\"\n",
                            tls.join("chain.pem").display(),
                            tls.join("key.pem").display(),
                        )
                    } else {
                        String::new()
                    },
                );
                let path = dir.path().join("preforkd.toml");
                std::fs::write(&path, text)?;
                let mut command = Command::new(&binaries.preforkd);
                command.arg("-c").arg(&path);
                config = Some(path);
                command
            }
            Kind::HaproxyTls => {
                let backend = options.backend.ok_or_else(|| std::io::Error::other("no backend"))?;
                let tls =
                    options.tls.as_ref().ok_or_else(|| std::io::Error::other("no certificate"))?;
                let path = dir.path().join("haproxy.cfg");
                std::fs::write(
                    &path,
                    format!(
                        "global\n nbthread {}\n maxconn 8000\n ssl-default-bind-options ssl-min-ver TLSv1.3\n\
                         defaults\n mode tcp\n timeout connect 5s\n timeout client 5m\n timeout server 5m\n\
                         listen tls\n bind {addr} ssl crt {}\n server backend {backend}\n",
                        options.workers,
                        tls.join("combined.pem").display()
                    ),
                )?;
                let mut command = Command::new("haproxy");
                command.arg("-db").arg("-f").arg(&path);
                command
            }
            Kind::NginxTls => {
                let backend = options.backend.ok_or_else(|| std::io::Error::other("no backend"))?;
                let tls =
                    options.tls.as_ref().ok_or_else(|| std::io::Error::other("no certificate"))?;
                let path = dir.path().join("nginx.conf");
                std::fs::write(
                    &path,
                    format!(
                        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                         daemon off;\nworker_processes {};\nworker_rlimit_nofile 65536;\n\
                         pid {}/nginx.pid;\nerror_log {}/error.log;\n\
                         events {{ worker_connections 30000; }}\n\
                         stream {{ server {{ listen {addr} ssl backlog=4096; ssl_protocols TLSv1.3;\n\
                         ssl_certificate {}; ssl_certificate_key {}; ssl_session_tickets on;\n\
                         proxy_pass {backend}; }} }}\n",
                        options.workers,
                        dir.path().display(),
                        dir.path().display(),
                        tls.join("chain.pem").display(),
                        tls.join("key.pem").display(),
                    ),
                )?;
                let mut command = Command::new("nginx");
                command.arg("-p").arg(dir.path()).arg("-c").arg(&path);
                command
            }
            // Started above, with the earlier binary.
            Kind::Before(_) => return Err(std::io::Error::other("a [before] row, started above")),
            Kind::Stunnel => {
                let backend = options.backend.ok_or_else(|| std::io::Error::other("no backend"))?;
                let tls =
                    options.tls.as_ref().ok_or_else(|| std::io::Error::other("no certificate"))?;
                let path = dir.path().join("stunnel.conf");
                std::fs::write(
                    &path,
                    format!(
                        "foreground = yes\npid =\ndebug = err\n[tls]\naccept = {addr}\nconnect = {backend}\n\
                         cert = {}\nkey = {}\nsslVersionMin = TLSv1.3\n",
                        tls.join("chain.pem").display(),
                        tls.join("key.pem").display(),
                    ),
                )?;
                let mut command = Command::new("stunnel4");
                command.arg(&path);
                command
            }
            Kind::Haproxy => {
                let backend = options.backend.ok_or_else(|| std::io::Error::other("no backend"))?;
                let path = dir.path().join("haproxy.cfg");
                std::fs::write(
                    &path,
                    format!(
                        "global\n nbthread {}\n maxconn 8000\n\
                         defaults\n mode tcp\n timeout connect 5s\n timeout client 5m\n timeout server 5m\n\
                         listen relay\n bind {addr}\n server backend {backend}\n",
                        options.workers
                    ),
                )?;
                let mut command = Command::new("haproxy");
                command.arg("-db").arg("-f").arg(&path);
                command
            }
            Kind::NginxStream => {
                let backend = options.backend.ok_or_else(|| std::io::Error::other("no backend"))?;
                let path = dir.path().join("nginx.conf");
                std::fs::write(
                    &path,
                    format!(
                        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                         daemon off;\nworker_processes {};\nworker_rlimit_nofile 65536;\n\
                         pid {}/nginx.pid;\nerror_log {}/error.log;\n\
                         events {{ worker_connections 30000; }}\n\
                         stream {{ server {{ listen {addr} backlog=4096; proxy_pass {backend}; }} }}\n",
                        options.workers,
                        dir.path().display(),
                        dir.path().display()
                    ),
                )?;
                let mut command = Command::new("nginx");
                command.arg("-p").arg(dir.path()).arg("-c").arg(&path);
                command
            }
        };
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).process_group(0);
        let mut child = command.spawn()?;
        if let Some(out) = child.stdout.take() {
            // Drain stdout so the server never blocks on it.
            thread::spawn(move || for _ in BufReader::new(out).lines() {});
        }
        let server = Server { addr, child, config, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                // Reap it (it may have exited already), so no zombie is left behind.
                server.stop();
                return Err(std::io::Error::other(format!(
                    "{} did not start on {addr}",
                    kind.label()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        // preforkd: its listener accepts into the backlog at once; wait for the workers.
        if let Some(config) = &server.config {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !preforkd_ready(&binaries.preforkd, config, options.workers)
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(server)
    }

    /// The pids of the server's process group.
    fn members(&self) -> Vec<i32> {
        let group = self.child.id() as i32;
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        // (pid, parent, process group) of every process.
        let all: Vec<(i32, i32, i32)> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| {
                let f = stat_fields(pid)?;
                Some((pid, f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
            })
            .collect();
        // The group, and the descendants of its members: preforkd's exec children lead
        // process groups of their own.
        let mut members: Vec<i32> =
            all.iter().filter(|(_, _, g)| *g == group).map(|(pid, _, _)| *pid).collect();
        loop {
            let more: Vec<i32> = all
                .iter()
                .filter(|(pid, parent, _)| members.contains(parent) && !members.contains(pid))
                .map(|(pid, _, _)| *pid)
                .collect();
            if more.is_empty() {
                return members;
            }
            members.extend(more);
        }
    }

    /// CPU time (user + system, clock ticks) of the server: live members, plus the children
    /// each of them already reaped.
    pub fn cpu_ticks(&self) -> u64 {
        let mut total = 0;
        for pid in self.members() {
            if let Some(f) = stat_fields(pid) {
                let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // Its own time, and that of the children it reaped (tcpserver and xinetd reap
                // theirs in the leader, preforkd's workers reap the programs exec starts).
                total += field(11) + field(12) + field(13) + field(14);
            }
        }
        total
    }

    /// Proportional set size of the group, KiB.
    pub fn pss_kib(&self) -> u64 {
        self.members()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
            .filter_map(|text| {
                let line = text.lines().find(|l| l.starts_with("Pss:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// Voluntary context switches (wake-ups) of the group's processes.
    pub fn wakeups(&self) -> u64 {
        self.members()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|text| {
                let line =
                    text.lines().find(|l| l.starts_with("voluntary_ctxt_switches:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// Stops the server: SIGTERM to its pid, then SIGKILL to its group and to any
    /// descendant that left it.
    pub fn stop(mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let descendants = self.members();
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
        for member in descendants.into_iter().filter(|m| *m != pid.as_raw()) {
            let _ = kill(Pid::from_raw(member), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Fields of /proc/PID/stat after the command name (so index 0 is the state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(text.rsplit(')').next()?.split_whitespace().map(str::to_owned).collect())
}

fn preforkd_ready(binary: &Path, config: &Path, workers: usize) -> bool {
    status(binary, config).is_some_and(|rows| rows.iter().filter(|r| r.ready).count() >= workers)
}

/// One worker row of `preforkd status`.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    /// State is `ready`.
    pub ready: bool,
    /// Connections accepted.
    pub accepted: u64,
}

/// The worker rows of `preforkd status -c config`.
pub fn status(binary: &Path, config: &Path) -> Option<Vec<WorkerRow>> {
    let output = Command::new(binary).arg("status").arg("-c").arg(config).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    Some(
        text.lines()
            .skip(2)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                Some(WorkerRow { ready: *f.get(3)? == "ready", accepted: f.get(5)?.parse().ok()? })
            })
            .collect(),
    )
}
