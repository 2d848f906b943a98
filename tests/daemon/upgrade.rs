//! Binary upgrade (USR2, WINCH, QUIT) and log file reopening (USR1).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

#[test]
fn usr2_upgrade_under_load_loses_nothing_then_the_old_master_leaves() {
    let mut daemon = Daemon::start(&controlled_config(
        2,
        "",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    ));
    let old = daemon.pid();
    let load = Load::start(daemon.addr(), 4, 4, Duration::from_millis(200));
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    let new = new_master_pid(&stdout);
    assert_ne!(new, old.as_raw());
    let pid_file = daemon.dir().join("preforkd.pid");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), new.to_string());
    assert_eq!(
        std::fs::read_to_string(daemon.dir().join("preforkd.pid.oldbin")).unwrap().trim(),
        old.to_string()
    );

    daemon.signal(Signal::SIGWINCH);
    daemon.wait_until_old_master("the old workers stop", |s| {
        s.master.pid == old.as_raw() && s.ready(s.master.generation).is_empty()
    });
    daemon.signal(Signal::SIGQUIT);
    let status = daemon.wait_master_exit(PATIENCE).expect("the old master exits");
    assert_eq!(code(status), 0);
    // The new master serves alone now, on the same socket.
    eventually("the new master's workers serve", || {
        let mut stream = connect(daemon.addr());
        exchange(&mut stream, b"new", QUICK) == Outcome::Echoed
    });
    let report = load.finish();
    report.assert_clean(51);
    let (_, status, _) = daemon.control("status");
    assert!(status.starts_with(&format!("master pid {new},")), "{status}");
    let (status, _, stderr) = daemon.control("stop");
    assert_eq!(code(status), 0, "{stderr}");
    eprintln!(
        "USR2 upgrade under load: {} exchanges on {} connections, {} keep-alive connections closed cleanly, 0 failures",
        report.exchanges, report.connections, report.keepalive_closed
    );
}

#[test]
fn a_failed_upgrade_leaves_the_old_master_serving() {
    let daemon = Daemon::start(&controlled_config(2, "", ""));
    let old = daemon.pid();
    let valid = std::fs::read_to_string(&daemon.config_path).unwrap();
    // The new binary cannot start: its configuration is invalid, so it exits with 78.
    std::fs::write(&daemon.config_path, "[daemon]\nworkers = 0\n").unwrap();
    daemon.signal(Signal::SIGUSR2);
    daemon.wait_until("the failure is noticed", |s| s.master.upgrades_failed == 1);
    let pid_file = daemon.dir().join("preforkd.pid");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), old.to_string());
    assert!(!daemon.dir().join("preforkd.pid.oldbin").exists());
    std::fs::write(&daemon.config_path, valid).unwrap();
    let (_, status, _) = daemon.control("status");
    assert!(status.starts_with(&format!("master pid {old},")), "{status}");
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"still here", QUICK), Outcome::Echoed);
}

fn access_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map_or(0, |text| text.lines().filter(|l| l.contains(" access ")).count())
}

#[test]
fn usr1_after_the_log_file_is_moved_writes_a_new_file_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("preforkd.log");
    let rotated = dir.path().join("preforkd.log.1");
    let config = controlled_config(
        2,
        "",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    )
    .replace("[log]\n", &format!("[log]\ntarget = \"file\"\npath = {:?}\n", log.to_str().unwrap()))
    .replace("@DIR@", dir.path().to_str().unwrap());
    let config_path = dir.path().join("preforkd.toml");
    std::fs::write(&config_path, config).unwrap();
    let config_arg = config_path.to_str().unwrap();
    let child = Command::new(BINARY)
        .args(["-c", config_arg])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let _guard = GroupGuard(child);
    let addr = wait_ready_of(&config_path).addrs().unwrap()[0];

    let mut served = 0;
    let one = |served: &mut usize| {
        let mut stream = connect(addr);
        assert_eq!(exchange(&mut stream, b"line", QUICK), Outcome::Echoed);
        *served += 1;
    };
    for _ in 0..20 {
        one(&mut served);
    }
    std::fs::rename(&log, &rotated).unwrap();
    for _ in 0..20 {
        one(&mut served);
    }
    let (status, stdout, stderr) = run_cli(&["reopen", "-c", config_arg]);
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains("logs reopened"));
    eventually("new access lines land in a new file", || {
        one(&mut served);
        access_lines(&log) >= 5
    });
    let (status, _, stderr) = run_cli(&["quit", "-c", config_arg]);
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(
        access_lines(&rotated) + access_lines(&log),
        served,
        "every access line is in one of the files"
    );
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("master exiting"),
        "the master writes to the new file too"
    );
}

#[test]
fn after_winch_the_old_master_resumes_when_the_new_one_dies_or_on_reload() {
    let daemon = Daemon::start(&controlled_config(1, "", ""));
    let old = daemon.pid();
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    let new = new_master_pid(&stdout);
    daemon.signal(Signal::SIGWINCH);
    daemon.wait_until_old_master("old workers stop", |s| {
        s.master.pid == old.as_raw() && s.ready(s.master.generation).is_empty()
    });
    // The new master dies badly: the old one takes its pid file back and serves again.
    kill(Pid::from_raw(new), Signal::SIGKILL).unwrap();
    daemon.wait_until("the old master resumes", |s| s.master.pid == old.as_raw() && s.serving());
    eventually("the pid file names the old master", || {
        std::fs::read_to_string(daemon.dir().join("preforkd.pid"))
            .is_ok_and(|t| t.trim() == old.to_string())
    });
    // The killed master's workers die with it (and may take a connection they had just
    // accepted with them); then only the old master's workers accept.
    eventually("the old master's workers serve", || {
        let mut stream = connect(daemon.addr());
        exchange(&mut stream, b"old again", QUICK) == Outcome::Echoed
    });
    // WINCH, then a reload starts the workers again, and says so at once.
    daemon.signal(Signal::SIGWINCH);
    daemon.wait_until("stopped again", |s| s.ready(s.master.generation).is_empty());
    let started = std::time::Instant::now();
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(started.elapsed() < QUICK);
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"resumed", QUICK), Outcome::Echoed);
}
