//! Runs the real `preforkd` binary on a temporary config and talks to it over loopback TCP.
//!
//! Readiness, generations, worker pids and listener addresses come from the daemon itself,
//! through the `preforkd status --json` document (the interface scripts use), never from its
//! log wording nor a sleep: every daemon the harness starts gets a pid file, so its scoreboard
//! can be found. The daemon runs in its own process group, which is killed on drop; its log
//! is printed when a test fails.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use preforkd::scoreboard::{self, Scoreboard};
use serde::Deserialize;
use socket2::{Domain, Socket, Type};

/// Upper bound of every wait in these tests; generous, since CI machines are small.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub const BINARY: &str = env!("CARGO_BIN_EXE_preforkd");

/// Longest pause between two reads of the status; a new log line (any) reads it sooner.
const STATUS_POLL: Duration = Duration::from_millis(10);

/// What `preforkd status --json` says about a daemon: the members the tests wait on (the
/// document has more; README.md, "Status", lists them all).
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub master: MasterStatus,
    /// Every worker process (booting, ready or draining), by slot.
    pub workers: Vec<WorkerStatus>,
    /// Every listener the master named, by id: configuration order at start.
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MasterStatus {
    pub pid: i32,
    /// The serving generation: 1 at start, one more per applied reload.
    pub generation: u64,
    pub target_workers: u64,
    /// Reloads rejected (invalid file, bind failure) or rolled back.
    pub reloads_rejected: u64,
    /// Binary upgrades whose new master did not come up.
    pub upgrades_failed: u64,
    /// Workers replaced because they asked to be (`daemon.recycle_*`).
    pub worker_recycles: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    /// `booting`, `ready` or `draining`.
    pub state: String,
    pub open: u64,
    pub started_unix_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    /// Where it is bound, as configured: `IP:PORT` with the port the kernel chose for port 0,
    /// `unix:/path` or `unix:@name`.
    pub address: Option<String>,
    /// Connections its retiring workers handed off.
    pub handed_off: u64,
    /// Connections its workers adopted from retiring ones.
    pub adopted: u64,
}

impl ListenerStatus {
    /// Its IP address; `None` for a Unix-domain listener or before it is published.
    pub fn ip(&self) -> Option<SocketAddr> {
        self.address.as_deref()?.parse().ok()
    }
}

impl Status {
    /// Pids of the ready workers of `generation`, by slot.
    pub fn ready(&self, generation: u64) -> Vec<i32> {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && w.state == "ready")
            .map(|w| w.pid)
            .collect()
    }

    /// The serving generation is whole: as many of its workers ready as the master wants.
    pub fn serving(&self) -> bool {
        self.ready(self.master.generation).len() as u64 >= self.master.target_workers.max(1)
    }

    /// The daemon is up: its serving generation is whole and every listener is bound.
    pub fn up(&self) -> bool {
        self.serving() && self.addrs().is_some_and(|addrs| !addrs.is_empty())
    }

    /// Every listener's IP address, by id; `None` unless every listener has one.
    pub fn addrs(&self) -> Option<Vec<SocketAddr>> {
        self.listeners.iter().map(ListenerStatus::ip).collect()
    }

    /// The IP address of the listener called `name`.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.listener(name)?.ip()
    }

    /// The listener called `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerStatus> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// Pids of every worker process, the longest running first.
    pub fn pids(&self) -> Vec<i32> {
        let mut workers: Vec<&WorkerStatus> = self.workers.iter().collect();
        workers.sort_by_key(|w| (w.started_unix_ms, w.slot));
        workers.iter().map(|w| w.pid).collect()
    }
}

/// The `status --json` document of the master whose pid file is `pid_file`, parsed; `None`
/// while no master answers (not started yet, gone, or its pid file being moved by an
/// upgrade). Panics when the document does not parse: its schema is an interface.
///
/// Read in this process, as `preforkd status --json` reads it (the pid file's lock, then the
/// scoreboard through [`preforkd::status_json::render`]), rather than by running the command
/// at every poll: each run would be a child whose exit (SIGCHLD, arriving while another test
/// thread spawns a process with its signals blocked) can wake a test's timed socket read with
/// `EINTR`, and costs a few milliseconds of CPU.
fn read_status(pid_file: &Path) -> Option<Status> {
    let pid = preforkd::pidfile::running_pid(pid_file).ok()?;
    let board = Scoreboard::open(&scoreboard::path_for(pid_file)).ok()?;
    let text = preforkd::status_json::render(&board);
    let status: Status = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status --json: not the documented document ({e}): {text}"));
    // A scoreboard the master has not stamped yet, or one a killed master left behind.
    (status.master.pid == pid).then_some(status)
}

/// The status of the master of the configuration file `config` (through its
/// `daemon.pid_file`), for a daemon started outside [`Daemon`].
pub fn status_of(config: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(config).ok()?;
    read_status(&configured_pid_file(&text, config.parent()?)?)
}

/// Polls `probe` until its status satisfies `condition`, and returns that status; `pause`
/// waits between polls and says whether to go on (false: the daemon is gone). Panics naming
/// `what`, with the last status seen, after [`PATIENCE`].
fn poll_status(
    what: &str,
    mut probe: impl FnMut() -> Option<Status>,
    mut condition: impl FnMut(&Status) -> bool,
    mut pause: impl FnMut(Duration) -> bool,
) -> Status {
    let deadline = Instant::now() + PATIENCE;
    let mut last = None;
    loop {
        if let Some(status) = probe() {
            if condition(&status) {
                return status;
            }
            last = Some(status);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting until {what}; last status: {last:#?}");
        if !pause(left.min(STATUS_POLL)) {
            // One last look: the daemon may have got there just before it exited.
            if let Some(status) = probe().filter(|s| condition(s)) {
                return status;
            }
            panic!("the daemon exited while waiting until {what}; last status: {last:#?}");
        }
    }
}

/// Waits until the daemon of the configuration `config`, started outside [`Daemon`], is
/// [up](Status::up); returns its status.
pub fn wait_ready_of(config: &Path) -> Status {
    poll_status(
        "the daemon is up",
        || status_of(config),
        Status::up,
        |pause| {
            thread::sleep(pause);
            true
        },
    )
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

type SharedLog = Arc<(Mutex<LogState>, Condvar)>;

pub struct Daemon {
    /// The program: `preforkd`, or an example built on the library.
    binary: PathBuf,
    child: Child,
    log: SharedLog,
    dir: tempfile::TempDir,
    /// The configuration file; rewrite it and reload.
    pub config_path: PathBuf,
    /// The master's pid file: the configuration's, or one the harness added.
    pid_file: Option<PathBuf>,
    /// Whether the harness added the pid file to the configuration (and so to every rewrite).
    added_pid_file: bool,
    /// Listener addresses, in configuration order, from `status --json`.
    pub addrs: Vec<SocketAddr>,
}

/// Where the harness puts the pid file of a configuration that sets none.
const ADDED_PID_FILE: &str = "preforkd.pid";

/// The `daemon.pid_file` that the configuration `text` sets (relative to `dir`); `None` when
/// it sets none or is not TOML.
fn configured_pid_file(text: &str, dir: &Path) -> Option<PathBuf> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let path = table.get("daemon")?.get("pid_file")?.as_str()?;
    Some(dir.join(path))
}

/// `text` with `daemon.pid_file = pid_file` added (a line after the `[daemon]` header, or a
/// `[daemon]` table at the end), when it is TOML that sets no pid file; `None` otherwise.
/// Deliberately invalid files are left as they are.
fn add_pid_file(text: &str, pid_file: &Path) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    if table.get("daemon").and_then(|d| d.get("pid_file")).is_some() {
        return None;
    }
    let line = format!("pid_file = {:?}\n", pid_file.to_str()?);
    let header = text
        .match_indices("[daemon]")
        .map(|(at, _)| at)
        .find(|&at| text[..at].ends_with('\n') || at == 0);
    let added = match header {
        Some(at) => {
            let end = text[at..].find('\n').map_or(text.len(), |n| at + n + 1);
            let newline = if end == text.len() && !text.ends_with('\n') { "\n" } else { "" };
            format!("{}{newline}{line}{}", &text[..end], &text[end..])
        }
        None => format!("{text}\n[daemon]\n{line}"),
    };
    // The same file with one key more, or nothing.
    let check: toml::Table = toml::from_str(&added).ok()?;
    check.get("daemon")?.get("pid_file")?;
    Some(added)
}

/// A config with `workers` workers and one echo listener on 127.0.0.1:0 with `policy` lines.
pub fn echo_config(workers: usize, daemon_extra: &str, policy: &str) -> String {
    format!(
        "[daemon]\nworkers = {workers}\ngraceful_timeout = \"10s\"\nallow_root_workers = true\n{daemon_extra}\n\
         [log]\nlevel = \"debug\"\naccess_log = true\n\
         [[listener]]\nname = \"echo\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n{policy}\n"
    )
}

/// [`echo_config`] with a pid file in the daemon's directory, for the control commands.
/// A reload or an upgrade keeps the socket of the configured address `127.0.0.1:0`, so the
/// port stays the one the kernel chose first.
pub fn controlled_config(workers: usize, daemon_extra: &str, policy: &str) -> String {
    echo_config(workers, &format!("pid_file = \"@DIR@/preforkd.pid\"\n{daemon_extra}"), policy)
}

impl Daemon {
    /// Starts the daemon and waits until every worker is ready ([`Daemon::wait_ready`]).
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with_nofile(config, None)
    }

    /// [`Daemon::start`], with `RLIMIT_NOFILE` set to `nofile` for the daemon if given.
    pub fn start_with_nofile(config: &str, nofile: Option<u64>) -> Daemon {
        Daemon::launch(config, nofile, &[])
    }

    /// Starts the daemon with `env` added to its environment. In `config`, `@DIR@` stands
    /// for the daemon's temporary directory (for pid and log files).
    pub fn launch(config: &str, nofile: Option<u64>, env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::spawn(&[], config, nofile, env);
        daemon.wait_ready();
        daemon
    }

    /// Spawns the daemon behind `wrapper` (a command that execs the rest of its arguments,
    /// such as `systemd-socket-activate -l ...`), without waiting for it to start.
    pub fn spawn(
        wrapper: &[&str],
        config: &str,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::spawn_program(Path::new(BINARY), wrapper, config, nofile, env)
    }

    /// [`Daemon::spawn`] for another program built on the preforkd library.
    pub fn spawn_program(
        binary: &Path,
        wrapper: &[&str],
        config: &str,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("preforkd.toml");
        let config = config.replace("@DIR@", dir.path().to_str().unwrap());
        let (config, pid_file, added_pid_file) = match configured_pid_file(&config, dir.path()) {
            Some(configured) => (config, Some(configured), false),
            None => {
                let added = dir.path().join(ADDED_PID_FILE);
                match add_pid_file(&config, &added) {
                    Some(text) => (text, Some(added), true),
                    None => (config, None, false),
                }
            }
        };
        std::fs::write(&config_path, config).expect("write config");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        command.envs(env.iter().copied());
        // SAFETY: the closure only makes setrlimit(2) system calls, which are
        // async-signal-safe, between fork and exec. No core dumps from killed workers.
        unsafe {
            command.pre_exec(move || {
                setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(io::Error::from)?;
                if let Some(limit) = nofile {
                    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn preforkd");
        let stderr = child.stderr.take().expect("stderr");
        let log: SharedLog = Arc::default();
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (state, changed) = &*sink;
                state.lock().unwrap().lines.push(line);
                changed.notify_all();
            }
            let (state, changed) = &*sink;
            state.lock().unwrap().closed = true;
            changed.notify_all();
        });
        Daemon {
            binary: binary.to_owned(),
            child,
            log,
            dir,
            config_path,
            pid_file,
            added_pid_file,
            addrs: Vec::new(),
        }
    }

    /// Waits until the daemon is [up](Status::up) (every worker the master wants ready, every
    /// listener bound), then learns the listeners' addresses ([`Daemon::addrs`]).
    pub fn wait_ready(&mut self) -> Status {
        let status = self.wait_until("every worker is ready and every listener bound", Status::up);
        self.addrs = status.addrs().expect("every listener is bound");
        status
    }

    /// Waits until the master serves generation `generation` with all its workers ready (a
    /// reload applied); workers of older generations may still drain.
    pub fn wait_generation(&self, generation: u64) -> Status {
        self.wait_until(&format!("generation {generation} serves"), |s| {
            s.master.generation == generation && s.serving()
        })
    }

    /// Waits until none of the workers `gone` is left (they were reaped) and the serving
    /// generation is whole again: they were replaced. Returns the ready workers' pids.
    pub fn wait_replaced(&self, gone: &[i32]) -> Vec<i32> {
        let status = self.wait_until(&format!("workers {gone:?} are replaced"), |s| {
            s.serving() && s.workers.iter().all(|w| !gone.contains(&w.pid))
        });
        status.ready(status.master.generation)
    }

    /// Polls the status until `condition` holds, and returns that status; panics naming
    /// `what` after [`PATIENCE`], or as soon as the daemon has exited.
    pub fn wait_until(&self, what: &str, condition: impl FnMut(&Status) -> bool) -> Status {
        self.poll(what, self.pid_file(), condition)
    }

    /// [`Daemon::wait_until`] on the old master of a binary upgrade, whose pid file (and
    /// scoreboard) moved to `PID_FILE.oldbin` while the new master runs.
    pub fn wait_until_old_master(
        &self,
        what: &str,
        condition: impl FnMut(&Status) -> bool,
    ) -> Status {
        let mut oldbin = self.pid_file().as_os_str().to_owned();
        oldbin.push(".oldbin");
        self.poll(what, Path::new(&oldbin), condition)
    }

    fn poll(&self, what: &str, pid_file: &Path, condition: impl FnMut(&Status) -> bool) -> Status {
        poll_status(
            what,
            || read_status(pid_file),
            condition,
            |pause| self.wait_for_activity(pause),
        )
    }

    /// Waits up to `timeout` for the daemon to log anything (a hint that its state changed,
    /// whatever the words). False once every process of the daemon has exited.
    fn wait_for_activity(&self, timeout: Duration) -> bool {
        let (state, changed) = &*self.log;
        let guard = state.lock().unwrap();
        let seen = guard.lines.len();
        let guard = changed
            .wait_timeout_while(guard, timeout, |log| !log.closed && log.lines.len() == seen)
            .unwrap()
            .0;
        !guard.closed
    }

    /// The status of this daemon now (`status --json`, parsed); `None` while no master
    /// answers.
    pub fn status(&self) -> Option<Status> {
        read_status(self.pid_file())
    }

    /// The master's pid file (the configuration's, or the one the harness added).
    ///
    /// # Panics
    /// When the configuration is not TOML (a daemon that cannot start has none).
    pub fn pid_file(&self) -> &Path {
        self.pid_file.as_deref().expect("a configuration with a pid file")
    }

    /// The daemon's temporary directory (`@DIR@` in its configuration).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the configuration file (`@DIR@` expanded, and the pid file the harness added
    /// at start added again), for a reload.
    pub fn rewrite_config(&self, config: &str) {
        let mut config = config.replace("@DIR@", self.dir.path().to_str().unwrap());
        if self.added_pid_file
            && let Some(text) = add_pid_file(&config, self.pid_file())
        {
            config = text;
        }
        std::fs::write(&self.config_path, config).expect("rewrite config");
    }

    /// Runs a control command (`reload`, `status` ...) against this daemon.
    pub fn control(&self, command: &str) -> (ExitStatus, String, String) {
        run_program(&self.binary, &[command, "-c", self.config_path.to_str().unwrap()])
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Lines matching `predicate` so far.
    pub fn matching(&self, predicate: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines().into_iter().filter(|l| predicate(l)).collect()
    }

    /// Waits until `count` lines match `predicate`; panics with `what` after [`PATIENCE`].
    pub fn wait_for_lines(
        &self,
        what: &str,
        count: usize,
        predicate: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let (state, changed) = &*self.log;
        let mut guard = state.lock().unwrap();
        loop {
            let found: Vec<String> = guard.lines.iter().filter(|l| predicate(l)).cloned().collect();
            if found.len() >= count {
                return found;
            }
            let now = Instant::now();
            if now >= deadline || guard.closed {
                drop(guard);
                panic!("waited for {count} log line(s): {what}; found {}", found.len());
            }
            guard = changed.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    pub fn wait_for_log(&self, what: &str, predicate: impl Fn(&str) -> bool) -> String {
        self.wait_for_lines(what, 1, predicate).remove(0)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the master");
    }

    /// Waits for the master to exit: every process of the daemon has closed the log pipe,
    /// then the status is collected. `None` if that takes longer than `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        {
            let (state, changed) = &*self.log;
            let mut guard = state.lock().unwrap();
            while !guard.closed {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                guard = changed.wait_timeout(guard, deadline - now).unwrap().0;
            }
        }
        // The pipe closes when the processes exit; the master is reaped right after.
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::yield_now();
        }
    }

    /// Waits for the master process itself to exit (its workers or an upgraded master may
    /// still hold the log pipe). `None` after `timeout`.
    pub fn wait_master_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pids of the daemon's worker processes now (every generation, booting, ready or
    /// draining), the longest running first.
    pub fn worker_pids(&self) -> Vec<i32> {
        self.wait_until("the daemon answers", |_| true).pids()
    }

    /// Pids of workers from their `worker started` log lines, in order: for a test of what
    /// the log says, not to learn which workers run ([`Daemon::worker_pids`]).
    pub fn logged_worker_pids(&self) -> Vec<i32> {
        self.matching(|l| l.contains("worker started")).iter().map(|l| pid_of(l)).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The daemon's own process group: the master, its workers and any master a binary
        // upgrade started, nothing else.
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        let _ = self.child.wait();
        if thread::panicking() {
            let mut err = io::stderr().lock();
            let _ = writeln!(err, "---- preforkd log ----");
            for line in self.lines() {
                let _ = writeln!(err, "{line}");
            }
        }
    }
}

/// The `pid=` field of a log line.
pub fn pid_of(line: &str) -> i32 {
    let rest = line.split(" pid=").nth(1).expect("pid field");
    rest.split(':').next().unwrap().parse().expect("pid")
}

/// The `key=value` field of an access line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// A connection to `addr` from the loopback address `source` (127.0.0.x stands for client x).
pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into()).expect("bind source");
    socket.connect_timeout(&addr.into(), PATIENCE).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    connect_from(Ipv4Addr::LOCALHOST, addr)
}

/// What a read saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The expected bytes.
    Echoed,
    /// The server closed the connection (FIN or RST).
    Closed,
    /// Nothing within the timeout.
    Silent,
}

/// Sends `message` and reads it back: [`Outcome::Echoed`], or how it failed.
pub fn exchange(stream: &mut TcpStream, message: &[u8], timeout: Duration) -> Outcome {
    if stream.write_all(message).is_err() {
        return Outcome::Closed;
    }
    expect_bytes(stream, message, timeout)
}

/// Reads exactly `expected`, or reports a close or silence.
pub fn expect_bytes(stream: &mut TcpStream, expected: &[u8], timeout: Duration) -> Outcome {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut got = vec![0; expected.len()];
    let outcome = match stream.read_exact(&mut got) {
        Ok(()) => {
            assert_eq!(got, expected, "echo must return the same bytes");
            Outcome::Echoed
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Outcome::Silent
        }
        Err(_) => Outcome::Closed,
    };
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    outcome
}

/// Runs `call` (a blocking read or receive) again while it fails with `EINTR`. A socket with
/// a timeout (`SO_RCVTIMEO`) is not restarted by the kernel after a signal, not even after a
/// stop and continue with no handler at all (signal(7)), so a timed wait for a datagram can
/// end with `Interrupted` and nothing received.
pub fn uninterrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// Waits for end-of-file (or a reset) within `timeout`; true if the server closed.
pub fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut byte = [0u8; 1];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut byte) {
            Ok(0) => break true,
            Ok(_) => panic!("unexpected data"),
            // A signal (or a stop and continue) woke the timed read: not a close.
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    };
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    closed
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

/// Runs `preforkd` with `args` to completion.
pub fn run_cli(args: &[&str]) -> (ExitStatus, String, String) {
    run_program(Path::new(BINARY), args)
}

/// Runs `program` with `args` to completion.
pub fn run_program(program: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The exit code, or a panic naming the signal that killed the process.
pub fn code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| panic!("killed by signal {:?}", status.signal()))
}

/// Resident memory of a process in KiB, from /proc.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An example program of this package, as `cargo test` builds it (beside the test binary,
/// in `target/PROFILE/examples/`).
pub fn example(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("test executable");
    let profile = test.parent().and_then(Path::parent).expect("target/PROFILE");
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it (or `cargo build --example {name}`)",
        path.display()
    );
    path
}

pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// CPU time (user + system) a process has used, in clock ticks, from /proc.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Open descriptors of process `pid` (0 once it is gone).
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Whether `pid` is a live process: false once it is gone or a zombie (exited, not yet
/// reaped by whoever adopted it).
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().unwrap().split_whitespace().next(), Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

/// Polls `condition` until it holds; panics naming `what` after [`PATIENCE`].
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Exchanges echoed intact.
    pub exchanges: u64,
    /// Connections opened.
    pub connections: u64,
    /// Keep-alive connections the server closed cleanly (FIN) between exchanges, after which
    /// the client reconnected and retried, as a keep-alive client does.
    pub keepalive_closed: u64,
    /// Everything else: refused or reset connections, wrong or missing echoes.
    pub failures: Vec<String>,
}

impl LoadReport {
    /// Panics unless nothing failed and at least `min_exchanges` exchanges were echoed.
    pub fn assert_clean(&self, min_exchanges: u64) {
        assert!(self.failures.is_empty(), "{} failures: {:#?}", self.failures.len(), self.failures);
        assert!(self.exchanges >= min_exchanges, "too little load to prove anything: {self:?}");
    }
}

/// The new master's pid from `preforkd upgrade`'s answer.
pub fn new_master_pid(stdout: &str) -> i32 {
    let rest = stdout.split("new master pid ").nth(1);
    rest.and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no new master pid in {stdout:?}"))
}

/// Client loops against `addr` until stopped: `short` loops of connect, 64-byte exchange,
/// close; and `long` loops that keep a connection and do an exchange every `pause`.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(addr: SocketAddr, short: usize, long: usize, pause: Duration) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for client in 0..short + long {
            let stop = Arc::clone(&stop);
            let keep_alive = client >= short;
            threads.push(thread::spawn(move || {
                if keep_alive {
                    long_loop(addr, client as u64, &stop, pause)
                } else {
                    short_loop(addr, client as u64, &stop)
                }
            }));
        }
        Load { stop, threads }
    }

    /// Stops the loops (each finishes its exchange) and adds up what they saw.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut total = LoadReport::default();
        for thread in self.threads {
            let report = thread.join().expect("load thread");
            total.exchanges += report.exchanges;
            total.connections += report.connections;
            total.keepalive_closed += report.keepalive_closed;
            total.failures.extend(report.failures);
        }
        total
    }
}

const LOAD_MESSAGE: usize = 64;
/// Bound on every load loop, whatever the test does.
const LOAD_MAX_ITERATIONS: u64 = 1_000_000;

fn short_loop(addr: SocketAddr, seed: u64, stop: &std::sync::atomic::AtomicBool) -> LoadReport {
    let mut report = LoadReport::default();
    let mut round = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && round < LOAD_MAX_ITERATIONS {
        round += 1;
        let message = random_bytes(LOAD_MESSAGE, seed << 32 | round);
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => {
                report.failures.push(format!("short {seed}: connect: {e}"));
                continue;
            }
        };
        report.connections += 1;
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut echoed = vec![0; LOAD_MESSAGE];
        match stream.write_all(&message).and_then(|()| stream.read_exact(&mut echoed)) {
            Ok(()) if echoed == message => report.exchanges += 1,
            Ok(()) => report.failures.push(format!("short {seed}: wrong echo")),
            Err(e) => report.failures.push(format!("short {seed}: {e}")),
        }
    }
    report
}

fn long_loop(
    addr: SocketAddr,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
    pause: Duration,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut connection: Option<TcpStream> = None;
    let mut round = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && round < LOAD_MAX_ITERATIONS {
        round += 1;
        let message = random_bytes(LOAD_MESSAGE, seed << 32 | round);
        // One retry, on a fresh connection, if the server closed a kept-alive one cleanly.
        for attempt in 0..2 {
            let reused = connection.is_some();
            let mut stream = match connection.take() {
                Some(stream) => stream,
                None => match TcpStream::connect(addr) {
                    Ok(stream) => {
                        report.connections += 1;
                        stream.set_read_timeout(Some(PATIENCE)).unwrap();
                        stream
                    }
                    Err(e) => {
                        report.failures.push(format!("long {seed}: connect: {e}"));
                        break;
                    }
                },
            };
            let mut echoed = vec![0; LOAD_MESSAGE];
            match stream.write_all(&message).and_then(|()| stream.read_exact(&mut echoed)) {
                Ok(()) if echoed == message => {
                    report.exchanges += 1;
                    connection = Some(stream);
                    break;
                }
                Ok(()) => {
                    report.failures.push(format!("long {seed}: wrong echo"));
                    break;
                }
                Err(e)
                    if reused
                        && attempt == 0
                        && matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe) =>
                {
                    report.keepalive_closed += 1;
                }
                Err(e) => {
                    report
                        .failures
                        .push(format!("long {seed}: {e} (attempt {attempt}, reused {reused})"));
                    break;
                }
            }
        }
        thread::sleep(pause);
    }
    report
}

/// Kills the process group of a daemon a test started itself (outside [`Daemon`]) when the
/// test ends, however it ends.
pub struct GroupGuard(pub Child);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Runs `preforkd` with `args`, killing it if it has not finished within `timeout`;
/// `None` then (it hung).
pub fn run_cli_within(args: &[&str], timeout: Duration) -> Option<(ExitStatus, String, String)> {
    let child = Command::new(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run preforkd");
    let pid = child.id() as i32;
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let output = child.wait_with_output().expect("wait for preforkd");
        let _ = done.send(());
        output
    });
    if finished.recv_timeout(timeout).is_err() {
        // Our own child's process group.
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        let _ = waiter.join();
        return None;
    }
    let output = waiter.join().expect("waiter");
    Some((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The TCP addresses process `pid` listens on, from its descriptors and /proc/net/tcp: for
/// a daemon whose log is not readable (or not on stderr).
pub fn listening_addrs(pid: i32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|entry| {
                let target = std::fs::read_link(entry.ok()?.path()).ok()?;
                let target = target.to_str()?;
                Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: LISTEN), inode.
            if fields.get(3) != Some(&"0A")
                || !inodes.iter().any(|i| Some(&i.as_str()) == fields.get(9))
            {
                return None;
            }
            let (ip, port) = fields[1].split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(SocketAddr::from((Ipv4Addr::from(u32::from_be(ip)), port)))
        })
        .collect()
}

/// Workers in state `ready` in `preforkd status` of the daemon of `config`.
pub fn ready_in_status(config: &Path) -> usize {
    let (status, stdout, _) = run_cli(&["status", "-c", config.to_str().unwrap()]);
    if !status.success() {
        return 0;
    }
    stdout.lines().filter(|l| l.contains(" ready ")).count()
}

/// As root: makes sure the workers' system user of the shipped configuration exists,
/// creating it from the shipped sysusers.d file as a package would (idempotent; a no-op when
/// it exists). Returns its uid; `None` when not root (nothing to create then: a master that
/// is not root ignores `daemon.user`).
pub fn ensure_preforkd_user() -> Option<u32> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    if let Some(user) = nix::unistd::User::from_name("preforkd").unwrap() {
        return Some(user.uid.as_raw());
    }
    let sysusers = repo_file("systemd/preforkd.sysusers");
    assert!(sysusers.exists(), "{} is missing", sysusers.display());
    let status = Command::new("systemd-sysusers").arg(&sysusers).status();
    if !status.is_ok_and(|s| s.success()) {
        // Without systemd-sysusers: what the sysusers.d line says, with useradd.
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/", "--shell"])
            .args(["/usr/sbin/nologin", "--comment", "preforkd worker processes", "preforkd"])
            .status()
            .expect("run useradd");
        assert!(status.success(), "could not create the preforkd user");
    }
    let user = nix::unistd::User::from_name("preforkd").unwrap().expect("preforkd was created");
    Some(user.uid.as_raw())
}

#[test]
fn the_harness_adds_a_pid_file_only_where_none_is_set() {
    let pid_file = Path::new("/tmp/x/preforkd.pid");
    let dir = Path::new("/tmp/x");
    let with_daemon = "[daemon]\nworkers = 1\n[[listener]]\nname = \"a\"\n";
    let added = add_pid_file(with_daemon, pid_file).expect("added");
    assert_eq!(
        added,
        "[daemon]\npid_file = \"/tmp/x/preforkd.pid\"\nworkers = 1\n[[listener]]\nname = \"a\"\n"
    );
    assert_eq!(configured_pid_file(&added, dir).as_deref(), Some(pid_file));
    // No [daemon] table: one at the end, after the last array table.
    let without = "[[listener]]\nname = \"a\"";
    let added = add_pid_file(without, pid_file).expect("added");
    assert!(
        added.starts_with(without)
            && added.ends_with("[daemon]\npid_file = \"/tmp/x/preforkd.pid\"\n")
    );
    let listeners: toml::Table = toml::from_str(&added).unwrap();
    assert_eq!(listeners["listener"].as_array().unwrap().len(), 1, "{added}");
    // A file that sets one, or that is not TOML, is left alone.
    assert_eq!(add_pid_file("[daemon]\npid_file = \"p.pid\"\n", pid_file), None);
    assert_eq!(
        configured_pid_file("[daemon]\npid_file = \"p.pid\"\n", dir),
        Some(dir.join("p.pid"))
    );
    assert_eq!(add_pid_file("[daemon\nworkers = \n", pid_file), None);
    assert_eq!(configured_pid_file("[daemon\n", dir), None);
}
