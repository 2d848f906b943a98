//! exec: a program per connection, as xinetd and tcpserver run them.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

/// A daemon with one exec listener per `(name, options)`, in order.
fn exec_daemon(workers: usize, listeners: &[(&str, &str)], env: &[(&str, &str)]) -> Daemon {
    let mut config = format!(
        "[daemon]\nworkers = {workers}\nallow_root_workers = true\npid_file = \"@DIR@/p.pid\"\n\
         [log]\nlevel = \"debug\"\n"
    );
    for (name, options) in listeners {
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
             short_idle_timeout = \"200ms\"\nmax_connections_per_client = 5\n\
             [listener.options]\n{options}\n"
        ));
    }
    Daemon::launch(&config, None, env)
}

/// Connects to listener `index`, sends `input` then FIN, returns all it gets back.
fn run(daemon: &Daemon, index: usize, input: &[u8]) -> Vec<u8> {
    let mut stream = connect(daemon.addrs[index]);
    let mut writer = stream.try_clone().unwrap();
    let input = input.to_vec();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut output = Vec::new();
    stream.read_to_end(&mut output).expect("read until the child is gone");
    sender.join().unwrap();
    output
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

/// The access line of the `n`th (from 1) connection on `listener`.
fn access_line(daemon: &Daemon, listener: &str, n: usize) -> String {
    let tag = format!("access listener={listener} ");
    daemon.wait_for_lines("access lines", n, |l| l.contains(&tag)).remove(n - 1)
}

#[test]
fn the_child_gets_the_connection_and_exactly_the_ucspi_environment() {
    let daemon = exec_daemon(
        2,
        &[
            ("cat", "program = \"/bin/cat\""),
            (
                "env",
                "program = \"/usr/bin/env\"\nenv = { GREETING = \"hi\" }\n\
                 pass_env = [\"PREFORKD_TEST_PASSED\", \"PREFORKD_TEST_ABSENT\"]",
            ),
            ("fds", "program = \"/bin/ls\"\nargs = [\"/proc/self/fd\"]"),
            (
                "self",
                "program = \"/bin/sh\"\nargs = [\"-c\", \"sleep 0.5; read -r stat </proc/self/stat; echo $stat; grep -E '^Sig(Blk|Ign)' /proc/self/status; pwd\"]\ndirectory = \"/tmp\"",
            ),
        ],
        &[("PREFORKD_TEST_PASSED", "yes"), ("PREFORKD_TEST_HIDDEN", "no")],
    );

    let data = random_bytes(1 << 20, 11);
    assert!(run(&daemon, 0, &data) == data, "/bin/cat must echo 1 MiB intact");

    let env = text(run(&daemon, 1, b""));
    let mut names: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "GREETING",
            "PREFORKD_TEST_PASSED",
            "PROTO",
            "TCPLOCALIP",
            "TCPLOCALPORT",
            "TCPREMOTEIP",
            "TCPREMOTEPORT"
        ],
        "{env}"
    );
    let port = daemon.addrs[1].port().to_string();
    for line in ["PROTO=TCP", "TCPLOCALIP=127.0.0.1", "TCPREMOTEIP=127.0.0.1", "GREETING=hi"] {
        assert!(env.lines().any(|l| l == line), "{line} missing from {env}");
    }
    assert!(env.lines().any(|l| l == format!("TCPLOCALPORT={port}")), "{env}");

    // Only standard input, output and error (3 is ls's own directory handle).
    assert_eq!(text(run(&daemon, 2, b"")), "0\n1\n2\n3\n");

    // Its own process group, an empty mask, nothing ignored, the configured directory; and
    // the short idle timeout (200 ms) does not cut it while it runs.
    let output = text(run(&daemon, 3, b""));
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 4, "{output}");
    let stat: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(stat[0], stat[4], "pid = process group: {output}");
    assert!(daemon.worker_pids().contains(&stat[3].parse().unwrap()), "a worker's child");
    assert_eq!(lines[1], "SigBlk:\t0000000000000000");
    // Nothing ignored, but the two real-time signals glibc keeps for itself (32 and 33),
    // which its posix_spawn leaves ignored in every child it starts (and so does ours).
    let ignored = u64::from_str_radix(lines[2].trim_start_matches("SigIgn:\t"), 16).unwrap();
    assert_eq!(ignored & !0x1_8000_0000, 0, "{}", lines[2]);
    assert_eq!(lines[3], "/tmp");
    let line = access_line(&daemon, "self", 1);
    assert_eq!(field(&line, "reason"), Some("child-exit"), "{line}");
    assert_eq!(field(&line, "status"), Some("exit:0"), "{line}");
}

#[test]
fn every_end_of_a_child_is_logged_with_its_status() {
    let daemon = exec_daemon(
        1,
        &[
            ("true", "program = \"/bin/true\""),
            ("killed", "program = \"/bin/sh\"\nargs = [\"-c\", \"kill -9 $$\"]"),
            (
                "stubborn",
                "program = \"/bin/sh\"\nargs = [\"-c\", \"trap '' TERM; echo started; while :; do read -t 1 x; done\"]\n\
                 max_lifetime = \"300ms\"\nkill_grace = \"300ms\"",
            ),
            ("noisy", "program = \"/bin/sh\"\nargs = [\"-c\", \"echo to the log >&2\"]"),
        ],
        &[],
    );
    assert!(run(&daemon, 0, b"").is_empty());
    let line = access_line(&daemon, "true", 1);
    assert_eq!(field(&line, "status"), Some("exit:0"), "{line}");
    assert!(field(&line, "child").is_some_and(|pid| pid.parse::<i32>().is_ok()), "{line}");

    run(&daemon, 1, b"");
    let line = access_line(&daemon, "killed", 1);
    assert_eq!(field(&line, "status"), Some("signal:SIGKILL"), "{line}");

    // Ignores SIGTERM: killed at max_lifetime + kill_grace.
    let opened = Instant::now();
    let mut stream = connect(daemon.addrs[2]);
    let mut output = String::new();
    stream.read_to_string(&mut output).unwrap();
    assert_eq!(output, "started\n");
    assert!(opened.elapsed() >= Duration::from_millis(600), "{:?}", opened.elapsed());
    let line = access_line(&daemon, "stubborn", 1);
    assert_eq!(field(&line, "status"), Some("signal:SIGKILL"), "{line}");
    assert_eq!(field(&line, "max_lifetime"), Some("SIGKILL"), "{line}");

    run(&daemon, 3, b"");
    let line = daemon.wait_for_log("the child's stderr", |l| l.contains(": to the log"));
    assert!(line.contains("exec pid="), "{line}");
}

/// Children of `pid` that are zombies.
fn zombie_children(pid: i32) -> usize {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children
        .split_whitespace()
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .is_ok_and(|stat| stat.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
        })
        .count()
}

#[test]
fn five_hundred_children_leave_no_zombie_and_no_descriptor() {
    let daemon = exec_daemon(1, &[("echo", "program = \"/bin/echo\"\nargs = [\"x\"]")], &[]);
    let worker = daemon.worker_pids()[0];
    let before = open_fds(worker);
    for round in 0..500 {
        assert_eq!(run(&daemon, 0, b""), b"x\n", "round {round}");
    }
    access_line(&daemon, "echo", 500);
    eventually("the last connection is closed", || open_fds(worker) == before);
    assert_eq!(zombie_children(worker), 0);
    let children = std::fs::read_to_string(format!("/proc/{worker}/task/{worker}/children"));
    assert_eq!(children.unwrap().trim(), "", "no child left");
    // Children are waited for through pidfds: their exits must not interrupt the worker.
    let sigchld = 1u64 << (Signal::SIGCHLD as u32 - 1);
    assert_eq!(signal_mask(worker, "SigCgt") & sigchld, 0, "the worker catches SIGCHLD");
}

/// A signal mask (`SigCgt`, `SigIgn` ...) of /proc/PID/status.
fn signal_mask(pid: i32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn a_child_that_never_reads_its_input_still_delivers_its_output() {
    // head reads one buffer, answers with its first byte and exits. The input is more than
    // the socket buffers hold, so some is still unread when it exits: a plain close would
    // send RST, which the client reads as an error after the answer (RFC 2525 2.17).
    let head = "program = \"/usr/bin/head\"\nargs = [\"-c\", \"1\"]";
    let daemon = exec_daemon(1, &[("head", head)], &[]);
    let input = vec![b'y'; 4 << 20];
    for round in 0..5 {
        assert_eq!(run(&daemon, 0, &input), b"y", "round {round}");
    }
}

#[test]
fn a_killed_worker_takes_its_children_with_it_and_its_counts_come_back() {
    let daemon = exec_daemon(1, &[("sleep", "program = \"/bin/sleep\"\nargs = [\"60\"]")], &[]);
    let worker = daemon.worker_pids()[0];
    let client = Ipv4Addr::new(127, 0, 0, 7);
    let held: Vec<_> = (0..5).map(|_| connect_from(client, daemon.addr())).collect();
    let children = || {
        std::fs::read_to_string(format!("/proc/{worker}/task/{worker}/children"))
            .map(|c| c.split_whitespace().map(|p| p.parse::<i32>().unwrap()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    eventually("5 children run", || children().len() == 5);
    let pids = children();
    // The quota is spent: a sixth connection from the same client is refused.
    let mut sixth = connect_from(client, daemon.addr());
    assert!(closed_within(&mut sixth, PATIENCE), "over max_connections_per_client");

    kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    eventually("every child ended", || pids.iter().all(|&pid| !is_running(pid)));
    drop(held);
    daemon.wait_replaced(&[worker]);
    // The dead worker's counts were reclaimed: the client has its five again.
    let again: Vec<_> = (0..5).map(|_| connect_from(client, daemon.addr())).collect();
    let new_worker = *daemon.worker_pids().last().unwrap();
    eventually("5 new children run", || {
        std::fs::read_to_string(format!("/proc/{new_worker}/task/{new_worker}/children"))
            .is_ok_and(|c| c.split_whitespace().count() == 5)
    });
    drop(again);
}

#[test]
fn check_refuses_what_exec_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[daemon]\nallow_root_workers = true\n\
         [[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         [listener.options]\nprogram = \"bin/cat\"\nenv = { PROTO = \"UDP\" }\n\
         max_lifetime = \"soon\"\nstderr = \"file\"\ncolour = 1\n\
         [[listener]]\nname = \"y\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         [listener.options]\nprogram = \"@SELF@\"\n"
            .replace("@SELF@", path.to_str().unwrap()),
    )
    .unwrap();
    let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stderr}");
    for expected in [
        "listener[0].options.program: \"bin/cat\" must be an absolute path",
        "listener[0].options.env: PROTO is set by preforkd",
        "listener[0].options.max_lifetime: invalid duration",
        "listener[0].options.stderr: unknown value \"file\"",
        "listener[0].options.colour: unknown field",
        "listener[1].options.program: is not executable",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing from:\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 6, "{stderr}");
}

#[test]
fn max_instances_caps_the_children_running_at_once_across_workers() {
    let daemon = exec_daemon(2, &[("cat", "program = \"/bin/cat\"\nmax_instances = 3")], &[]);
    // Ten clients (distinct addresses, so no per-client limit is in play), each trying one
    // exchange while all keep their connections: exactly three are served.
    let mut streams: Vec<_> =
        (0..10).map(|i| connect_from(Ipv4Addr::new(127, 0, 3, 10 + i), daemon.addr())).collect();
    let outcomes: Vec<Outcome> =
        streams.iter_mut().map(|s| exchange(s, b"hello", Duration::from_secs(2))).collect();
    let served = outcomes.iter().filter(|o| **o == Outcome::Echoed).count();
    assert_eq!(served, 3, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Closed).count(), 7, "{outcomes:?}");
    crate::admission::expect_refused(&daemon, "listener-full", 7);
    // One child ends (its client closes): one more fits, and only one.
    let first = outcomes.iter().position(|o| *o == Outcome::Echoed).unwrap();
    drop(streams.remove(first));
    access_line(&daemon, "cat", 1);
    let mut again = connect_from(Ipv4Addr::new(127, 0, 3, 30), daemon.addr());
    assert_eq!(exchange(&mut again, b"again", PATIENCE), Outcome::Echoed);
    let mut over = connect_from(Ipv4Addr::new(127, 0, 3, 31), daemon.addr());
    assert_eq!(exchange(&mut over, b"over", PATIENCE), Outcome::Closed);
}
