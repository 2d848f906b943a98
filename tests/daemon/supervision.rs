//! Reload, pool resizing, hung workers, crash loops, control commands.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

#[test]
fn twenty_reloads_under_load_lose_nothing() {
    let policy = |short: u32| {
        format!(
            "short_idle_timeout = \"{short}s\"\nmax_connections_per_client = 0\nmax_long_connections_per_client = 0"
        )
    };
    let daemon = Daemon::start(&controlled_config(2, "", &policy(10)));
    let load = Load::start(daemon.addr(), 4, 4, Duration::from_millis(200));
    let mut durations = Vec::new();
    for round in 0..20u32 {
        daemon.rewrite_config(&controlled_config(2, "", &policy(10 + round % 2 + 1)));
        let started = Instant::now();
        let (status, stdout, stderr) = daemon.control("reload");
        durations.push(started.elapsed());
        assert_eq!(code(status), 0, "reload {round}: {stderr}");
        assert!(stdout.contains(&format!("generation {} serving", round + 2)), "{stdout}");
    }
    let report = load.finish();
    report.assert_clean(101);
    let (_, status, _) = daemon.control("status");
    assert!(status.contains("generation 21"), "{status}");
    durations.sort();
    eprintln!(
        "20 reloads under load: reload (HUP to all new workers ready) min {:?}, median {:?}, max {:?}; \
         {} exchanges on {} connections, {} keep-alive connections closed cleanly by draining workers, 0 failures",
        durations[0],
        durations[10],
        durations[19],
        report.exchanges,
        report.connections,
        report.keepalive_closed
    );
}

#[test]
fn an_invalid_config_on_reload_keeps_the_old_policy() {
    let limited = "max_connections_per_client = 2\nmax_long_connections_per_client = 0";
    let daemon = Daemon::start(&controlled_config(2, "", limited));
    daemon.rewrite_config(&controlled_config(2, "colour = 1", "max_connections_per_client = -5"));
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 78, "{stderr}");
    assert!(stderr.contains("daemon.colour: unknown field"), "{stderr}");
    assert!(
        stderr.contains("listener[0].max_connections_per_client: -5 is out of range"),
        "{stderr}"
    );
    // A raw HUP is rejected by the daemon itself, which logs every problem.
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("the daemon rejects the file", |l| {
        l.contains("reload failed, still serving generation 1") && l.contains("-5 is out of range")
    });
    // Still the old policy: two connections per client.
    let client = Ipv4Addr::new(127, 0, 0, 6);
    let mut streams: Vec<_> = (0..3).map(|_| connect_from(client, daemon.addr())).collect();
    // Whichever two a worker admits first are served; the other is refused. All stay open
    // until the end, so no release can let a third one in.
    let outcomes: Vec<Outcome> = streams.iter_mut().map(|s| exchange(s, b"n", QUICK)).collect();
    let served = outcomes.iter().filter(|o| **o == Outcome::Echoed).count();
    let refused = outcomes.iter().filter(|o| **o == Outcome::Closed).count();
    assert_eq!((served, refused), (2, 1), "{outcomes:?}");
}

#[test]
fn a_lowered_limit_applies_to_new_connections_and_counts_carry_over() {
    let daemon = Daemon::start(&controlled_config(
        2,
        "",
        "max_connections_per_client = 4\nmax_long_connections_per_client = 0",
    ));
    let client = Ipv4Addr::new(127, 0, 0, 7);
    let mut old: Vec<_> = (0..4).map(|_| connect_from(client, daemon.addr())).collect();
    for stream in &mut old {
        assert_eq!(exchange(stream, b"old", QUICK), Outcome::Echoed);
    }
    // Keep the old connections busy, so the draining workers keep them open.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let keeper = {
        let busy = std::sync::Arc::clone(&busy);
        std::thread::spawn(move || {
            let mut rounds = 0;
            while busy.load(std::sync::atomic::Ordering::SeqCst) && rounds < 10_000 {
                rounds += 1;
                for stream in &mut old {
                    assert_eq!(
                        exchange(stream, b"busy", QUICK),
                        Outcome::Echoed,
                        "an old connection broke"
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            old
        })
    };
    daemon.rewrite_config(&controlled_config(
        2,
        "",
        "max_connections_per_client = 2\nmax_long_connections_per_client = 0",
    ));
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    // The client already holds 4 (on the old generation): over the new quota of 2.
    let mut refused = connect_from(client, daemon.addr());
    assert_eq!(
        exchange(&mut refused, b"new", QUICK),
        Outcome::Closed,
        "the old generation's counts carry over"
    );
    busy.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut old = keeper.join().expect("old connections served through the reload");
    // Handed over to the new generation, the old connections live on and keep their counts.
    for stream in &mut old {
        assert_eq!(exchange(stream, b"moved", QUICK), Outcome::Echoed, "handed off, not closed");
    }
    // Down to one: the new quota of 2 leaves room for exactly one more.
    old.truncate(1);
    let mut kept = Vec::new();
    eventually("the closed connections are released", || {
        let mut probe = connect_from(client, daemon.addr());
        let served = exchange(&mut probe, b"probe", QUICK) == Outcome::Echoed;
        if served {
            kept.push(probe);
        }
        served
    });
    let mut refused = 0;
    let more: Vec<_> = (0..2).map(|_| connect_from(client, daemon.addr())).collect();
    for mut stream in more {
        match exchange(&mut stream, b"n", QUICK) {
            Outcome::Echoed => kept.push(stream),
            Outcome::Closed => refused += 1,
            Outcome::Silent => panic!("a connection was neither served nor refused"),
        }
    }
    assert_eq!((old.len() + kept.len(), refused), (2, 2), "the new quota of 2");
}

fn ready_workers(daemon: &Daemon) -> usize {
    let (status, stdout, stderr) = daemon.control("status");
    assert_eq!(code(status), 0, "{stderr}");
    stdout.lines().filter(|l| l.contains(" ready ")).count()
}

#[test]
fn ttin_and_ttou_resize_the_pool_seen_in_status() {
    let daemon = Daemon::start(&controlled_config(2, "", ""));
    assert_eq!(ready_workers(&daemon), 2);
    daemon.signal(Signal::SIGTTIN);
    eventually("3 ready workers", || ready_workers(&daemon) == 3);
    // One at a time: like any signal, two pending TTOU merge into one.
    daemon.signal(Signal::SIGTTOU);
    eventually("2 ready workers", || ready_workers(&daemon) == 2);
    daemon.signal(Signal::SIGTTOU);
    eventually("1 ready worker", || ready_workers(&daemon) == 1);
    daemon.signal(Signal::SIGTTOU);
    daemon.wait_for_log("the last worker stays", |l| l.contains("one worker is the minimum"));
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"one left", QUICK), Outcome::Echoed);
    let (_, status, _) = daemon.control("status");
    assert!(status.contains("1 workers wanted"), "{status}");
}

#[test]
fn a_hung_worker_is_killed_and_replaced() {
    let timeout = Duration::from_secs(1);
    let config = format!(
        "{}\n[[listener]]\nname = \"hang\"\naddress = \"127.0.0.1:0\"\nservice = \"test-hang\"\n",
        echo_config(1, "worker_timeout = \"1s\"", "")
    );
    let daemon = Daemon::launch(&config, None, &[("PREFORKD_TEST_SERVICES", "1")]);
    let wedged = daemon.worker_pids()[0];
    let mut trap = connect(daemon.addrs[1]);
    std::io::Write::write_all(&mut trap, b"x").unwrap();
    let started = Instant::now();
    daemon.wait_for_log("the hang is detected", |l| l.contains(&format!("(pid {wedged}) is hung")));
    daemon.wait_replaced(&[wedged]);
    let took = started.elapsed();
    // worker_timeout, plus the master's check interval (a quarter of it), plus slack.
    assert!(took < timeout + timeout / 4 + Duration::from_secs(3), "replaced after {took:?}");
    assert!(
        !is_running(wedged) || {
            eventually("the wedged worker dies", || !is_running(wedged));
            true
        }
    );
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"served again", QUICK), Outcome::Echoed);
}

#[test]
fn a_crash_loop_backs_off() {
    let daemon = Daemon::start(&echo_config(1, "", ""));
    let started = Instant::now();
    for _ in 1..=5 {
        let pid = *daemon.worker_pids().last().unwrap();
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        daemon.wait_replaced(&[pid]);
    }
    // Five quick deaths: respawns after 0.1, 0.2, 0.4, 0.8 and 1.6 s at least (jitter only
    // adds). A master that respawned at once would be done in a few milliseconds.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(3100), "5 respawns took only {took:?}");
    daemon.wait_for_log("backoff is logged", |l| l.contains("crash-looping (5 quick exits)"));
}

#[test]
fn control_commands_stop_and_quit_wait_for_the_master() {
    let mut daemon = Daemon::start(&controlled_config(2, "", ""));
    let (status, stdout, stderr) = daemon.control("reopen");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains("logs reopened"));
    let (status, stdout, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains("stopped"), "{stdout}");
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exited")), 0);
    assert!(!daemon.dir().join("preforkd.pid").exists(), "the pid file is removed on exit");
    let (status, _, stderr) = daemon.control("status");
    assert_eq!(code(status), 69, "{stderr}");
    assert!(stderr.contains("not running"), "{stderr}");
}

#[test]
fn a_second_master_on_the_same_pid_file_is_refused() {
    let daemon = Daemon::start(&controlled_config(1, "", ""));
    let (status, _, stderr) = run_cli(&["-c", daemon.config_path.to_str().unwrap()]);
    assert_eq!(code(status), 69, "{stderr}");
    assert!(
        stderr.contains(&format!("another preforkd is running as pid {}", daemon.pid())),
        "{stderr}"
    );
}

#[test]
fn reloads_beyond_max_draining_generations_stop_the_oldest_fast() {
    // exec's connections are never handed off (its child owns the socket): a busy one
    // keeps each old generation draining.
    let config =
        controlled_config(1, "max_draining_generations = 1", "max_connections_per_client = 0")
            .replace("service = \"echo\"", "service = \"exec\"")
            + "[listener.options]\nprogram = \"/bin/cat\"\nuser = \"nobody\"\n";
    let daemon = Daemon::start(&config);
    let busy_on_current_generation = || {
        let mut stream = connect(daemon.addr());
        assert_eq!(exchange(&mut stream, b"hold", QUICK), Outcome::Echoed);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut rounds = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) && rounds < 10_000 {
                rounds += 1;
                if exchange(&mut stream, b"busy", QUICK) != Outcome::Echoed {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            true
        });
        (stop, thread)
    };
    let (stop_first, first) = busy_on_current_generation();
    assert_eq!(code(daemon.control("reload").0), 0);
    let (stop_second, second) = busy_on_current_generation();
    assert_eq!(code(daemon.control("reload").0), 0);
    daemon.wait_for_log("the cap is enforced", |l| l.contains("stopping generation 1 fast"));
    assert!(!first.join().unwrap(), "generation 1's connection was closed by the fast stop");
    stop_second.store(true, std::sync::atomic::Ordering::SeqCst);
    stop_first.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        second.join().unwrap(),
        "generation 2 drains gracefully: its busy connection was served"
    );
}

#[test]
fn reload_binds_new_listeners_closes_removed_ones_and_resizes_the_pool() {
    let second =
        "\n[[listener]]\nname = \"second\"\naddress = \"127.0.0.2:0\"\nservice = \"echo\"\n";
    let daemon = Daemon::start(&format!("{}{second}", controlled_config(2, "", "")));
    let removed = daemon.addrs[1];
    let mut stream = connect(removed);
    assert_eq!(exchange(&mut stream, b"second", QUICK), Outcome::Echoed);
    drop(stream);

    // A new listener on a taken address rejects the whole reload.
    let taken = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let clash = format!(
        "{}\n[[listener]]\nname = \"clash\"\naddress = \"{}\"\nservice = \"echo\"\n",
        controlled_config(3, "", ""),
        taken.local_addr().unwrap()
    );
    daemon.rewrite_config(&clash);
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 70, "{stderr}");
    assert!(
        stderr.contains("could not bind") && stderr.contains("Address already in use"),
        "{stderr}"
    );
    let mut stream = connect(removed);
    assert_eq!(exchange(&mut stream, b"kept", QUICK), Outcome::Echoed, "nothing changed");
    drop(stream);

    // Without the second listener and with 3 workers: applied.
    daemon.rewrite_config(&controlled_config(3, "", ""));
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    eventually("3 workers of generation 2", || {
        let (_, status, _) = daemon.control("status");
        status.lines().filter(|l| l.contains(" ready ")).count() == 3
            && status
                .lines()
                .all(|l| !l.contains(" ready ") || l.split_whitespace().nth(2) == Some("2"))
    });
    eventually("the removed listener is closed", || std::net::TcpStream::connect(removed).is_err());
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"first", QUICK), Outcome::Echoed, "the kept listener serves");
}

#[test]
fn a_reload_that_shortens_worker_timeout_does_not_abort_healthy_workers() {
    // 3 s, not 1 s: a worker beats every third of the timeout, so with 1 s a healthy worker
    // kept off the CPU for 667 ms is (rightly, by the configuration) taken for hung, and a
    // 2-core machine running the whole suite under load can hold a process back that long.
    let timeout = Duration::from_secs(3);
    let daemon = Daemon::start(&controlled_config(1, "worker_timeout = \"30s\"", ""));
    daemon.rewrite_config(&controlled_config(1, "worker_timeout = \"3s\"", ""));
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    // Only generation 2 from now on (an old worker may still take a connection just before
    // it stops accepting, and close it as idle while it drains).
    daemon.wait_until("the old worker is gone", |s| s.workers.iter().all(|w| w.generation != 1));
    // Two timeouts of idleness (the master checks every quarter of one): a worker still
    // beating at the old pace, every 10 s, would be aborted.
    let mut stream = connect(daemon.addr());
    assert!(!closed_within(&mut stream, timeout * 2), "the idle connection survives");
    assert!(
        daemon.matching(|l| l.contains("is hung")).is_empty(),
        "a healthy worker was taken for hung"
    );
    assert_eq!(exchange(&mut stream, b"alive", QUICK), Outcome::Echoed);
}
