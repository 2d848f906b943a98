//! Regressions of the fault-injection and local-attacker review (issue #14): privilege
//! boundaries, bounded operator inputs, control commands that check what they signal.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

/// How long a command that must not hang may take.
const PROMPT: Duration = Duration::from_secs(5);
/// Patience for one exchange.
const QUICK: Duration = Duration::from_secs(10);

#[test]
fn check_and_startup_refuse_a_fifo_a_device_and_a_huge_file_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let huge = dir.path().join("huge.toml");
    let mut text = echo_config(1, "", "");
    text.push_str(&"#".repeat(2 << 20));
    std::fs::write(&huge, text).unwrap();
    for (path, reason) in [
        (fifo.to_str().unwrap(), "is a FIFO, not a regular file"),
        ("/dev/zero", "is a character device, not a regular file"),
        (huge.to_str().unwrap(), "more than the limit of 1048576 bytes"),
    ] {
        for args in [&["check", "-c", path][..], &["-c", path][..]] {
            let (status, _, stderr) =
                run_cli_within(args, PROMPT).unwrap_or_else(|| panic!("preforkd {args:?} hung"));
            assert_eq!(code(status), 66, "{args:?}: {stderr}");
            assert!(stderr.contains(reason), "{args:?}: {stderr}");
        }
    }
}

/// A pid file naming `pid` and locked by this test process (as a running master's is),
/// with the configuration that points at it; `status` and friends then look at `board`.
struct FakeMaster {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    _lock: std::fs::File,
}

impl FakeMaster {
    fn new(pid: u32) -> FakeMaster {
        let dir = tempfile::tempdir().unwrap();
        let pid_path = dir.path().join("preforkd.pid");
        std::fs::write(&pid_path, format!("{pid}\n")).unwrap();
        let lock = std::fs::File::open(&pid_path).unwrap();
        lock.lock().unwrap();
        let config = dir.path().join("preforkd.toml");
        let text = controlled_config(1, "", "").replace("@DIR@", dir.path().to_str().unwrap());
        std::fs::write(&config, text).unwrap();
        FakeMaster { dir, config, _lock: lock }
    }

    fn board(&self) -> std::path::PathBuf {
        self.dir.path().join("preforkd.pid.scoreboard")
    }

    fn run(&self, command: &str) -> (std::process::ExitStatus, String, String) {
        run_cli_within(&[command, "-c", self.config.to_str().unwrap()], PROMPT)
            .unwrap_or_else(|| panic!("preforkd {command} hung"))
    }
}

#[test]
fn status_refuses_a_scoreboard_whose_header_claims_a_huge_capacity() {
    use std::os::unix::fs::FileExt;
    let fake = FakeMaster::new(std::process::id());
    drop(preforkd::scoreboard::Scoreboard::create(Some(&fake.board()), 4).unwrap());
    // The second field of the header is the slot count: 2^57 slots of 128 bytes is 2^64
    // bytes, which wraps to 0 in an unchecked size computation.
    let file = std::fs::OpenOptions::new().write(true).open(fake.board()).unwrap();
    file.write_all_at(&(1u64 << 57).to_le_bytes(), 8).unwrap();
    let (status, _, stderr) = fake.run("status");
    assert_eq!(code(status), 69, "{stderr}");
    assert!(stderr.contains("is not a preforkd scoreboard"), "{stderr}");
    assert!(stderr.contains("claims 144115188075855872 slots"), "{stderr}");
}

/// A `sleep` process of our own, standing for an innocent process whose pid a forged file
/// names: if a control command signals it, it dies (and the test sees it).
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(std::process::Command::new("sleep").arg("600").spawn().expect("spawn sleep"))
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn untouched(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn control_commands_refuse_to_signal_a_pid_that_is_not_the_master() {
    let mut daemon = Daemon::start(&controlled_config(1, "", ""));
    let mut bystander = Bystander::start();
    // The pid file rewritten in place: the master's lock on it stays.
    std::fs::write(daemon.dir().join("preforkd.pid"), format!("{}\n", bystander.pid())).unwrap();
    for command in ["stop", "quit", "reopen", "reload"] {
        let (status, _, stderr) =
            run_cli_within(&[command, "-c", daemon.config_path.to_str().unwrap()], PROMPT)
                .unwrap_or_else(|| panic!("preforkd {command} hung"));
        assert_eq!(code(status), 69, "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("refusing to signal pid {}", bystander.pid())),
            "{stderr}"
        );
        assert!(bystander.untouched(), "preforkd {command} signalled the bystander");
    }
    // The real master is untouched too, and still answers to its own pid.
    std::fs::write(daemon.dir().join("preforkd.pid"), format!("{}\n", daemon.pid())).unwrap();
    let (status, _, stderr) = daemon.control("stop");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(daemon.wait_exit(PATIENCE).is_some());
}

#[test]
fn a_forged_scoreboard_does_not_make_a_control_command_signal_its_pid() {
    let mut bystander = Bystander::start();
    let fake = FakeMaster::new(bystander.pid() as u32);
    let board = preforkd::scoreboard::Scoreboard::create(Some(&fake.board()), 1).unwrap();
    board.header().master_pid.store(bystander.pid(), std::sync::atomic::Ordering::Relaxed);
    // Without the start time: refused.
    let (status, _, stderr) = fake.run("stop");
    assert_eq!(code(status), 69, "{stderr}");
    assert!(stderr.contains("start time differs"), "{stderr}");
    assert!(bystander.untouched());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped the ownership half: needs root to give the file away (CI runs as root)");
        return;
    }
    // With the right start time, but written by another user than the process runs as.
    let ticks = preforkd::sys::process_start_ticks(bystander.pid()).unwrap();
    board.header().master_start_ticks.store(ticks, std::sync::atomic::Ordering::Relaxed);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
    nix::unistd::chown(&fake.board(), Some(nobody.uid), None).unwrap();
    let (status, _, stderr) = fake.run("stop");
    assert_eq!(code(status), 69, "{stderr}");
    assert!(stderr.contains(&format!("belongs to uid {}", nobody.uid)), "{stderr}");
    assert!(bystander.untouched());
}

/// Starts the daemon of `config_path` (its log not on stderr) in its own process group and
/// waits, through `preforkd status`, until `workers` workers are ready.
fn start_quiet(config_path: &std::path::Path, workers: usize) -> GroupGuard {
    let child = std::process::Command::new(BINARY)
        .arg("-c")
        .arg(config_path)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let guard = GroupGuard(child);
    eventually("the workers are ready", || ready_in_status(config_path) == workers);
    guard
}

#[test]
fn usr1_never_follows_a_symlink_planted_in_a_log_directory_the_worker_user_can_write() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to switch workers to another user (CI runs as root)");
        return;
    }
    let worker = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The log directory belongs to the workers' user, as a careless setup would have it.
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    nix::unistd::chown(&logs, Some(worker.uid), Some(worker.gid)).unwrap();
    let log = logs.join("preforkd.log");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "root's secret\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = controlled_config(1, "user = \"nobody\"", "")
        .replace("allow_root_workers = true\n", "")
        .replace(
            "[log]\n",
            &format!("[log]\ntarget = \"file\"\npath = {:?}\n", log.to_str().unwrap()),
        )
        .replace("@DIR@", dir.path().to_str().unwrap());
    let config_path = dir.path().join("preforkd.toml");
    std::fs::write(&config_path, config).unwrap();
    let guard = start_quiet(&config_path, 1);
    let master = guard.0.id() as i32;

    // The workers' user neither owns nor can write the log file.
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!(meta.uid(), 0, "the log file belongs to root");
    assert_eq!(meta.mode() & 0o022, 0, "nobody else may write it: {:o}", meta.mode());

    // What the workers' user can do in its directory: move the file away and plant a
    // symlink to a root-owned file in its place.
    std::fs::rename(&log, logs.join("preforkd.log.1")).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    kill(Pid::from_raw(master), Signal::SIGUSR1).unwrap();
    let (status, _, stderr) = run_cli(&["reopen", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code(status), 70, "the reopen is refused: {stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    // Workers log an access line each; the master keeps writing the old file.
    let addr = listening_addrs(master)[0];
    let mut stream = connect(addr);
    assert_eq!(exchange(&mut stream, b"after the plant", QUICK), Outcome::Echoed);
    drop(stream);
    let (status, _, stderr) = run_cli(&["stop", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stderr}");

    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "the victim's owner is unchanged");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's secret\n");
    let old = std::fs::read_to_string(logs.join("preforkd.log.1")).unwrap();
    assert!(old.contains("access listener=echo"), "workers' lines still reach the old file");
    assert!(old.contains("master exiting"), "{old}");
}

#[test]
fn a_full_log_device_counts_dropped_lines_reports_them_once_and_status_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    // Every write to /dev/full fails with ENOSPC, like a full log filesystem.
    let config = controlled_config(1, "", "")
        .replace("[log]\n", "[log]\ntarget = \"file\"\npath = \"/dev/full\"\n")
        .replace("@DIR@", dir.path().to_str().unwrap());
    let config_path = dir.path().join("preforkd.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut guard = start_quiet(&config_path, 1);
    let addr = listening_addrs(guard.0.id() as i32)[0];
    for round in 0..50 {
        let mut stream = connect(addr);
        assert_eq!(exchange(&mut stream, b"lost line", QUICK), Outcome::Echoed, "{round}");
    }
    let dropped = || {
        let (_, stdout, _) = run_cli(&["status", "-c", config_path.to_str().unwrap()]);
        let count = stdout.split(" log lines dropped").next().and_then(|s| s.rsplit(' ').next());
        count.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
    };
    // 50 access lines at least (and the debug lines around them).
    eventually("status counts the dropped lines", || dropped() >= 50);
    let (status, _, stderr) = run_cli(&["quit", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stderr}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(guard.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let reports = stderr.lines().filter(|l| l.contains("could not be written")).count();
    // Once at the first drop, then at most once per 10 s, plus once at exit.
    assert!((1..=4).contains(&reports), "{reports} reports:\n{stderr}");
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_shipped_setup_runs_workers_as_a_dedicated_user_not_nobody() {
    let shipped = std::fs::read_to_string(repo_file("config/preforkd.toml")).unwrap();
    assert!(shipped.contains("\nuser = \"preforkd\"\n"), "the shipped config uses preforkd");
    let sysusers = std::fs::read_to_string(repo_file("systemd/preforkd.sysusers")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u preforkd ")), "{sysusers}");
    let makefile = std::fs::read_to_string(repo_file("Makefile")).unwrap();
    assert!(makefile.contains("$(SYSUSERSDIR)/preforkd.conf"), "make install installs it");
    let Some(uid) = ensure_preforkd_user() else {
        eprintln!("skipped running it: needs root (CI runs as root)");
        return;
    };
    let nobody = nix::unistd::User::from_name("nobody").unwrap().map(|u| u.uid.as_raw());
    assert_ne!(Some(uid), nobody);
    let dir = tempfile::tempdir().unwrap();
    // The echo listener only (the other shipped listeners have fixed ports of their own).
    let echo_only = shipped.split("\n# The other inetd internal services").next().unwrap();
    let config = echo_only
        .replace("127.0.0.1:7788", "127.0.0.1:0")
        .replace("workers = 4", "workers = 2")
        .replace("/tmp/preforkd-7788.pid", &format!("{}/preforkd.pid", dir.path().display()));
    let config_path = dir.path().join("preforkd.toml");
    std::fs::write(&config_path, config).unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    let guard = start_quiet(&config_path, 2);
    let (_, stdout, _) = run_cli(&["status", "-c", config_path.to_str().unwrap()]);
    let workers: Vec<i32> = stdout
        .lines()
        .filter(|l| l.contains(" ready "))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{stdout}");
    for worker in workers {
        assert_eq!(uid_of(worker), uid, "worker {worker} runs as preforkd");
    }
    let mut stream = connect(listening_addrs(guard.0.id() as i32)[0]);
    assert_eq!(exchange(&mut stream, b"as preforkd", QUICK), Outcome::Echoed);
}

/// One configuration startup refuses: how to make it, and what `check` must say.
struct Refusal {
    what: &'static str,
    /// Needs root (the credentials checks only apply to a root master).
    root_only: bool,
    /// `[daemon]` lines added to a valid one-listener config, and replacements in it.
    daemon_extra: &'static str,
    replace: &'static [(&'static str, &'static str)],
    /// Prepares the temporary directory `@DIR@`.
    setup: fn(&std::path::Path),
    expected: &'static str,
}

fn nothing(_: &std::path::Path) {}

/// Every startup refusal that follows from the configuration on this machine. What startup
/// alone can see is left out on purpose: an address in use now, a running master holding the
/// pid file, sockets passed by systemd, fork/mmap/signal failures (see config::environment).
const REFUSALS: &[Refusal] = &[
    Refusal {
        what: "unknown user",
        root_only: true,
        daemon_extra: "user = \"no-such-user-preforkd\"",
        replace: &[("allow_root_workers = true\n", "")],
        setup: nothing,
        expected: "daemon.user: unknown user \"no-such-user-preforkd\"",
    },
    Refusal {
        what: "unknown group",
        root_only: true,
        daemon_extra: "user = \"nobody\"\ngroup = \"no-such-group-preforkd\"",
        replace: &[("allow_root_workers = true\n", "")],
        setup: nothing,
        expected: "daemon.group: unknown group \"no-such-group-preforkd\"",
    },
    Refusal {
        what: "root workers without the opt-in",
        root_only: true,
        daemon_extra: "",
        replace: &[("allow_root_workers = true\n", "")],
        setup: nothing,
        expected: "daemon.user: the master runs as root and workers would too",
    },
    Refusal {
        what: "a user that is root without the opt-in",
        root_only: true,
        daemon_extra: "user = \"root\"",
        replace: &[("allow_root_workers = true\n", "")],
        setup: nothing,
        expected: "daemon.user: \"root\" is root",
    },
    Refusal {
        // A missing last directory is created at startup (as systemd's RuntimeDirectory=
        // would), so only a deeper one is a refusal.
        what: "a pid file in a missing directory",
        root_only: false,
        daemon_extra: "pid_file = \"@DIR@/missing/deeper/preforkd.pid\"",
        replace: &[],
        setup: nothing,
        expected: "daemon.pid_file: directory",
    },
    Refusal {
        what: "a log file in a missing directory",
        root_only: false,
        daemon_extra: "",
        replace: &[(
            "[log]\n",
            "[log]\ntarget = \"file\"\npath = \"@DIR@/missing/preforkd.log\"\n",
        )],
        setup: nothing,
        expected: "missing: No such file or directory",
    },
    Refusal {
        what: "a log path that is a symlink",
        root_only: false,
        daemon_extra: "",
        replace: &[("[log]\n", "[log]\ntarget = \"file\"\npath = \"@DIR@/link.log\"\n")],
        setup: |dir| {
            std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("link.log")).unwrap()
        },
        expected: "is a symbolic link",
    },
    Refusal {
        what: "a log path that is a FIFO",
        root_only: false,
        daemon_extra: "",
        replace: &[("[log]\n", "[log]\ntarget = \"file\"\npath = \"@DIR@/fifo.log\"\n")],
        setup: |dir| {
            let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
            nix::unistd::mkfifo(&dir.join("fifo.log"), mode).unwrap();
        },
        expected: "is a FIFO",
    },
    Refusal {
        what: "an unreachable syslog socket",
        root_only: false,
        daemon_extra: "",
        replace: &[(
            "[log]\n",
            "[log]\ntarget = \"syslog\"\nsyslog_socket = \"@DIR@/no-such-socket\"\n",
        )],
        setup: nothing,
        expected: "log.syslog_socket: cannot reach syslog",
    },
    Refusal {
        what: "an address of no local interface",
        root_only: false,
        daemon_extra: "",
        // TEST-NET-1 (RFC 5737): never a local address.
        replace: &[("127.0.0.1:0", "192.0.2.1:7")],
        setup: nothing,
        expected: "listener[0].address: could not bind 192.0.2.1:7",
    },
    Refusal {
        what: "a limits table over its bound",
        root_only: false,
        daemon_extra: "event_backend = \"epoll\"\nmax_connections_per_worker = 1048576",
        replace: &[("workers = 1\n", "workers = 512\n")],
        setup: nothing,
        expected: "per-client records, more than 4194304",
    },
    Refusal {
        what: "a duplicate listener name on a listener with another error",
        root_only: false,
        daemon_extra: "",
        replace: &[(
            "[[listener]]",
            "[[listener]]\nname = \"echo\"\naddress = \"nowhere\"\nservice = \"echo\"\n[[listener]]",
        )],
        setup: nothing,
        expected: "duplicate listener name \"echo\"",
    },
];

#[test]
fn every_startup_refusal_has_a_check_twin() {
    let root = nix::unistd::geteuid().is_root();
    for refusal in REFUSALS {
        if refusal.root_only && !root {
            eprintln!("skipped {:?}: needs root (CI runs as root)", refusal.what);
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        (refusal.setup)(dir.path());
        let mut config = echo_config(1, refusal.daemon_extra, "");
        for (from, to) in refusal.replace {
            config = config.replacen(from, to, 1);
        }
        let config = config.replace("@DIR@", dir.path().to_str().unwrap());
        let path = dir.path().join("preforkd.toml");
        std::fs::write(&path, config).unwrap();
        let path = path.to_str().unwrap();

        let (status, _, stderr) = run_cli_within(&["-c", path], PATIENCE)
            .unwrap_or_else(|| panic!("{}: startup neither refused nor failed", refusal.what));
        assert_ne!(code(status), 0, "{}: startup refuses it: {stderr}", refusal.what);

        let (status, stdout, stderr) = run_cli_within(&["check", "-c", path], PROMPT)
            .unwrap_or_else(|| panic!("{}: check hung", refusal.what));
        assert_eq!(code(status), 78, "{}: check refuses it too: {stdout}{stderr}", refusal.what);
        assert!(stderr.contains(refusal.expected), "{}: {stderr}", refusal.what);
        assert!(stderr.contains("preforkd.toml:"), "{}: located: {stderr}", refusal.what);
    }
}

#[test]
fn status_stop_and_quit_find_the_master_while_the_config_is_invalid() {
    let mut daemon = Daemon::start(&controlled_config(1, "", ""));
    let pid = daemon.pid().to_string();
    // Mid-edit: a value out of range and a syntax error after the pid file.
    let valid = std::fs::read_to_string(&daemon.config_path).unwrap();
    let broken = valid.replace("workers = 1", "workers = 0") + "\n[log\nlevel = \n";
    std::fs::write(&daemon.config_path, &broken).unwrap();
    let (status, _, _) = run_cli(&["check", "-c", daemon.config_path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "the file is invalid");
    let (status, stdout, stderr) = daemon.control("status");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains(&format!("master pid {pid},")), "{stdout}");
    assert!(stderr.contains("is not valid now"), "says why it read the file leniently: {stderr}");
    // --pid-file needs no configuration at all.
    let pid_file = daemon.dir().join("preforkd.pid");
    let (status, stdout, stderr) = run_cli(&[
        "status",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "-c",
        "/nonexistent/preforkd.toml",
    ]);
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains(&format!("master pid {pid},")), "{stdout}");
    // A reload still refuses the invalid file, and changes nothing.
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 78, "{stderr}");
    let (status, stdout, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains("stopped"), "{stdout}");
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exited")), 0);
}

#[test]
fn ttin_stops_at_the_slots_fixed_at_start_and_says_so_in_status_and_the_docs() {
    // 1 worker x 2 x (1 + 1 draining generation) = 4 slots.
    let daemon = Daemon::start(&controlled_config(1, "max_draining_generations = 1", ""));
    let (_, stdout, _) = daemon.control("status");
    assert!(stdout.contains(", 4 worker slots"), "{stdout}");
    for wanted in 2..=4 {
        daemon.signal(Signal::SIGTTIN);
        eventually(&format!("{wanted} ready workers"), || {
            let (_, stdout, _) = daemon.control("status");
            stdout.lines().filter(|l| l.contains(" ready ")).count() == wanted
        });
    }
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_for_log("the refusal", |l| {
        l.contains("all 4 worker slots are in use (fixed at start")
    });
    for doc in ["README.md", "man/preforkd.8"] {
        let text = std::fs::read_to_string(repo_file(doc)).unwrap().replace('\n', " ");
        assert!(
            text.contains("workers × 2 × (1 + max_draining_generations)")
                || text.contains("workers \\(mu 2 \\(mu (1 +"),
            "{doc} documents the TTIN cap"
        );
    }
}
