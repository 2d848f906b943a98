//! A service's worker hooks (`Service::after_fork`, `Service::before_exit`), through the
//! test-only `test-hooks` service, which records each call in a file named by the worker's
//! pid: where they run (each worker, as its user), when (before the worker is counted ready,
//! at a graceful and a fast stop), and what a failing `after_fork` does (stops the start;
//! later, a crash loop with backoff that ends when the cause does).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use preforkd::scoreboard::{self, Scoreboard};

use crate::harness::*;

const TEST_SERVICES: &[(&str, &str)] = &[("PREFORKD_TEST_SERVICES", "1")];

/// A directory every user may write in (the workers run as `nobody` when the tests run as
/// root), outside the daemon's own (which only root may enter).
fn hooks_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// `user = "nobody"` when running as root, so that the hooks show the privileges dropped.
fn user_line() -> &'static str {
    if nix::unistd::geteuid().is_root() { "user = \"nobody\"\n" } else { "" }
}

fn hooks_config(dir: &Path, extra_options: &str) -> String {
    format!(
        "[daemon]\nworkers = 2\ngraceful_timeout = \"5s\"\n{}\
         [[listener]]\nname = \"hooked\"\naddress = \"127.0.0.1:0\"\nservice = \"test-hooks\"\n\
         [listener.options]\ndir = \"{}\"\n{extra_options}",
        user_line(),
        dir.display()
    )
}

fn record(dir: &Path, hook: &str, pid: i32) -> Option<String> {
    std::fs::read_to_string(dir.join(format!("{hook}-{pid}"))).ok()
}

#[test]
fn hooks_run_in_each_worker_as_its_user_before_it_is_ready_and_when_it_stops() {
    let dir = hooks_dir();
    let mut daemon = Daemon::launch(&hooks_config(dir.path(), ""), None, TEST_SERVICES);
    let status = daemon.wait_ready();
    let uid = match nix::unistd::geteuid().is_root() {
        true => nix::unistd::User::from_name("nobody").unwrap().expect("user nobody").uid,
        false => nix::unistd::geteuid(),
    };
    let first = status.ready(1);
    assert_eq!(first.len(), 2);
    for worker in &status.workers {
        // Written before the worker said Ready, so it is there as soon as the status says so.
        let text = record(dir.path(), "after_fork", worker.pid).expect("after_fork ran");
        assert_eq!(
            text,
            format!("slot={} generation=1 listener=hooked uid={uid}", worker.slot),
            "in the worker, after the switch to its user"
        );
    }
    assert!(
        record(dir.path(), "after_fork", daemon.pid().as_raw()).is_none(),
        "never in the master"
    );
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"hooked\n", PATIENCE), Outcome::Echoed);
    drop(stream);

    // A reload (HUP: `preforkd reload` checks the file first, without the test services):
    // the new generation's workers run after_fork, the old ones before_exit as their
    // graceful stop ends.
    daemon.signal(Signal::SIGHUP);
    let second = daemon.wait_generation(2).ready(2);
    for &pid in &second {
        let text = record(dir.path(), "after_fork", pid).expect("after_fork ran");
        assert!(text.contains("generation=2"), "{text}");
    }
    eventually("the old generation's before_exit hooks ran", || {
        first.iter().all(|&pid| record(dir.path(), "before_exit", pid).is_some())
    });
    for &pid in &first {
        assert_eq!(record(dir.path(), "before_exit", pid).as_deref(), Some("graceful"));
    }

    // A fast stop: each worker's hook says so before it exits.
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(PATIENCE).map(code), Some(0));
    for &pid in &second {
        assert_eq!(record(dir.path(), "before_exit", pid).as_deref(), Some("fast"), "{pid}");
    }
}

#[test]
fn a_failing_after_fork_stops_the_start_and_later_backs_off_until_it_succeeds() {
    let dir = hooks_dir();
    let flag = dir.path().join("database-down");
    std::fs::write(&flag, "").unwrap();
    let options = format!("fail_if = \"{}\"\n", flag.display());

    // At start: the daemon stops with 70, the hook's words in its log.
    let mut daemon = Daemon::spawn(&[], &hooks_config(dir.path(), &options), None, TEST_SERVICES);
    assert_eq!(daemon.wait_exit(PATIENCE).map(code), Some(70), "workers cannot boot");
    let reason = format!("after_fork: {} exists", flag.display());
    let failed = daemon.matching(|l| l.contains("worker failed to boot") && l.contains(&reason));
    assert!(!failed.is_empty(), "the hook's message is logged");

    // Once serving: a replacement whose hook fails is respawned with backoff, and serves as
    // soon as the cause is gone; the other worker serves meanwhile.
    std::fs::remove_file(&flag).unwrap();
    let mut daemon = Daemon::launch(&hooks_config(dir.path(), &options), None, TEST_SERVICES);
    let status = daemon.wait_ready();
    // Serving, not only up: a boot failure while the master still starts stops it.
    let board = Scoreboard::open(&scoreboard::path_for(daemon.pid_file())).unwrap();
    eventually("the master says it is ready", || {
        board.header().ready_unix_ms.load(Ordering::Acquire) > 0
    });
    std::fs::write(&flag, "").unwrap();
    let victim = status.ready(1)[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    daemon.wait_for_lines("replacements that cannot boot", 2, |l| {
        l.contains("could not boot (its log line says why)")
    });
    daemon.wait_for_log("a crash loop's backoff", |l| l.contains("is crash-looping"));
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"still served\n", PATIENCE), Outcome::Echoed);
    assert!(daemon.status().is_some(), "the daemon is up");
    std::fs::remove_file(&flag).unwrap();
    let replaced = daemon.wait_replaced(&[victim]);
    assert_eq!(replaced.len(), 2);
}

#[test]
fn a_connection_a_drain_keeps_hears_of_it_once_and_one_handed_off_never() {
    let dir = hooks_dir();
    let config = hooks_config(dir.path(), "").replace("workers = 2", "workers = 1")
        + "[[listener]]\nname = \"echo\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n";
    let mut daemon = Daemon::launch(&config, None, TEST_SERVICES);
    let status = daemon.wait_ready();
    let (hooked, echo) = (status.address("hooked").unwrap(), status.address("echo").unwrap());
    let mut kept = connect(hooked);
    assert_eq!(exchange(&mut kept, b"one\n", PATIENCE), Outcome::Echoed);
    let mut moved = connect(echo);
    assert_eq!(exchange(&mut moved, b"one\n", PATIENCE), Outcome::Echoed);

    // A reload: test-hooks cannot move, so the old worker keeps it and tells it, once; it is
    // served on. The echo connection moves and is told nothing.
    daemon.signal(Signal::SIGHUP);
    daemon.wait_generation(2);
    assert_eq!(expect_bytes(&mut kept, b"draining\n", PATIENCE), Outcome::Echoed);
    assert_eq!(exchange(&mut kept, b"two\n", PATIENCE), Outcome::Echoed, "served on");
    assert_eq!(exchange(&mut moved, b"two\n", PATIENCE), Outcome::Echoed, "no notice");
    let mut late = connect(hooked);
    assert_eq!(exchange(&mut late, b"new\n", PATIENCE), Outcome::Echoed);

    // A graceful stop: the connection already told is not told again, and is closed at rest;
    // the one the new generation serves is told, then closed.
    daemon.signal(Signal::SIGQUIT);
    let mut rest = Vec::new();
    kept.set_read_timeout(Some(PATIENCE)).unwrap();
    std::io::Read::read_to_end(&mut kept, &mut rest).unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "", "told once, then closed");
    let mut rest = Vec::new();
    late.set_read_timeout(Some(PATIENCE)).unwrap();
    std::io::Read::read_to_end(&mut late, &mut rest).unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "draining\n", "told, then closed at rest");
    assert_eq!(daemon.wait_exit(PATIENCE).map(code), Some(0));
}

#[test]
fn a_rolled_back_reload_leaves_status_naming_the_serving_address() {
    let dir = hooks_dir();
    let flag = dir.path().join("database-down");
    let options = format!("fail_if = \"{}\"\n", flag.display());
    let config = hooks_config(dir.path(), &options);
    let mut daemon = Daemon::launch(&config, None, TEST_SERVICES);
    let serving = daemon.wait_ready().address("hooked").expect("bound");

    // A reload that moves the listener to 127.0.0.2, whose workers cannot boot: the master
    // forks them (publishing the new address), then rolls back to generation 1.
    std::fs::write(&flag, "").unwrap();
    daemon.rewrite_config(&config.replace("127.0.0.1:0", "127.0.0.2:0"));
    daemon.signal(Signal::SIGHUP);
    let status = daemon.wait_until("the reload is rolled back", |s| s.master.reloads_rejected > 0);
    assert_eq!((status.master.generation, status.master.reloads_rejected), (1, 1));
    assert_eq!(status.address("hooked"), Some(serving), "status names where generation 1 serves");
    let mut stream = connect(serving);
    assert_eq!(exchange(&mut stream, b"still here\n", PATIENCE), Outcome::Echoed);
}
