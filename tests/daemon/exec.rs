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
        // The children's default user (preforkd-exec) may not exist on a test machine.
        let user = if options.contains("user =") { "" } else { "user = \"nobody\"\n" };
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
             short_idle_timeout = \"200ms\"\nmax_connections_per_client = 5\n\
             [listener.options]\n{user}{options}\n"
        ));
    }
    Daemon::launch(&config, None, env)
}

/// The daemon's exec spawners: the master's children that are not workers.
pub fn spawner_pids(daemon: &Daemon) -> Vec<i32> {
    let workers = daemon.worker_pids();
    children_of(daemon.pid().as_raw()).into_iter().filter(|p| !workers.contains(p)).collect()
}

/// The children of process `pid` (proc(5)).
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|c| c.split_whitespace().map(|p| p.parse().unwrap()).collect())
        .unwrap_or_default()
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
    let parent: i32 = stat[3].parse().unwrap();
    // Two workers get one spawner each where they can run in parallel (one per CPU at most).
    let spawners = spawner_pids(&daemon);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert_eq!(spawners.len(), cpus.min(2), "{spawners:?}");
    assert!(
        spawners.contains(&parent),
        "the spawner's child, not a worker's: {parent}, {spawners:?}"
    );
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
    let spawner = spawner_pids(&daemon)[0];
    let client = Ipv4Addr::new(127, 0, 0, 7);
    let held: Vec<_> = (0..5).map(|_| connect_from(client, daemon.addr())).collect();
    let children = || children_of(spawner);
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
    eventually("5 new children run", || children().len() == 5);
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
         [listener.options]\nuser = \"nobody\"\nprogram = \"bin/cat\"\nenv = { PROTO = \"UDP\" }\n\
         max_lifetime = \"soon\"\nstderr = \"file\"\ncolour = 1\n\
         [[listener]]\nname = \"y\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         [listener.options]\nuser = \"nobody\"\nprogram = \"@SELF@\"\n"
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

/// Whether this test runs as root; else prints why it is skipped.
fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("{test}: skipped: only root can run exec children as another user");
    }
    root
}

/// uid, gid and supplementary groups of `nobody` (the test's unprivileged user).
fn nobody() -> (u32, u32) {
    let user = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
    (user.uid.as_raw(), user.gid.as_raw())
}

#[test]
fn children_run_as_their_user_and_cannot_signal_the_workers() {
    if !root_or_skip("children_run_as_their_user_and_cannot_signal_the_workers") {
        return;
    }
    // The workers run as root here (allow_root_workers), the children as nobody; the child
    // reads a worker's pid and tries to stop and kill it.
    let script = "grep -E '^(Uid|Gid|Groups):' /proc/self/status; read -r pid; \
                  kill -STOP $pid 2>/dev/null; echo stop=$?; kill -KILL $pid 2>/dev/null; echo kill=$?";
    let daemon = exec_daemon(
        1,
        &[("who", &format!("program = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]\ngroups = []"))],
        &[],
    );
    let worker = daemon.worker_pids()[0];
    let output = text(run(&daemon, 0, format!("{worker}\n").as_bytes()));
    let (uid, gid) = nobody();
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"), "{output}");
    assert_eq!(lines[1], format!("Gid:\t{gid}\t{gid}\t{gid}\t{gid}"), "{output}");
    assert_eq!(lines[2].trim_end(), "Groups:", "no supplementary group: {output}");
    assert_eq!(lines[3..], ["stop=1", "kill=1"], "kill(1) got EPERM: {output}");
    // The worker was neither stopped nor killed: it serves the next connection.
    assert_eq!(daemon.worker_pids(), [worker]);
    let state = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap();
    let state = state.rsplit_once(") ").unwrap().1.chars().next().unwrap();
    assert_ne!(state, 'T', "the worker is not stopped");
    let again = text(run(&daemon, 0, format!("{worker}\n").as_bytes()));
    assert!(again.ends_with("stop=1\nkill=1\n"), "{again}");
}

/// This process's nice value, from /proc (field 19 of its stat).
fn own_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[16].parse().expect("a nice value")
}

#[test]
fn process_settings_reach_the_child_before_it_runs() {
    if !root_or_skip("process_settings_reach_the_child_before_it_runs") {
        return;
    }
    let script = "umask; cut -d' ' -f19 /proc/self/stat; \
                  grep -E '^Max (address space|cpu time|data size|stack size|open files|resident set)' /proc/self/limits";
    // Five above this process's own nice value (inherited by the daemon): lowering it needs
    // CAP_SYS_NICE, which the spawner does not keep, so a suite run under `nice -n 10` would
    // otherwise ask for what it may not have.
    let nice = (own_nice() + 5).min(19);
    let options = format!(
        "program = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]\numask = \"027\"\nnice = {nice}\n\
         rlimits = {{ as = \"1G\", cpu = 30, data = \"512M\", rss = 65536, stack = \"8M\", nofile = 64 }}"
    );
    let daemon = exec_daemon(1, &[("settings", &options)], &[]);
    let output = text(run(&daemon, 0, b""));
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[..2], ["0027", &nice.to_string()], "umask and nice value: {output}");
    let limit = |name: &str| -> Vec<&str> {
        let line = lines.iter().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{output}"));
        line[name.len()..].split_whitespace().take(2).collect()
    };
    assert_eq!(limit("Max cpu time"), ["30", "30"]);
    assert_eq!(limit("Max address space"), ["1073741824", "1073741824"]);
    assert_eq!(limit("Max data size"), ["536870912", "536870912"]);
    assert_eq!(limit("Max stack size"), ["8388608", "8388608"]);
    assert_eq!(limit("Max resident set"), ["65536", "65536"]);
    assert_eq!(limit("Max open files"), ["64", "64"]);
}

#[test]
fn check_reports_bad_process_settings_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[daemon]\nallow_root_workers = true\n\
         [[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         [listener.options]\nprogram = \"/bin/cat\"\nuser = \"nobody\"\numask = \"099\"\nnice = 40\n\
         rlimits = { nofile = 2, cpu = \"5M\",\n  stack = -1 }\n",
    )
    .unwrap();
    let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stderr}");
    for expected in [
        ":10:9: listener[0].options.umask: \"099\" is not an umask",
        ":11:8: listener[0].options.nice: 40 is not a nice value",
        ":12:22: listener[0].options.rlimits.nofile: 2 is too low",
        ":12:31: listener[0].options.rlimits.cpu: \"5M\" is not a number of seconds",
        ":13:11: listener[0].options.rlimits.stack: -1 is negative",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing from:\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 5, "{stderr}");
}

#[test]
fn check_says_how_to_create_the_default_user_and_warns_of_writable_programs() {
    if !root_or_skip("check_says_how_to_create_the_default_user_and_warns_of_writable_programs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exec.toml");
    let write = |options: &str| {
        std::fs::write(
            &path,
            format!(
                "[daemon]\nallow_root_workers = true\n[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\n\
                 service = \"exec\"\n[listener.options]\n{options}\n"
            ),
        )
        .unwrap();
    };
    if nix::unistd::User::from_name("preforkd-exec").unwrap().is_none() {
        write("program = \"/bin/cat\"");
        let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
        assert_eq!(code(status), 78, "{stderr}");
        assert!(
            stderr.contains("listener[0].options.user: the default user \"preforkd-exec\"")
                && stderr.contains("useradd --system"),
            "{stderr}"
        );
    } else {
        println!("the default user exists here: its absence is not tested");
    }
    // A program in a directory anyone may write: both users could replace it.
    let bin = tempfile::tempdir().unwrap();
    let program = bin.path().join("true");
    std::fs::copy("/bin/true", &program).unwrap();
    std::fs::set_permissions(bin.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .unwrap();
    write(&format!("program = \"{}\"\nuser = \"nobody\"", program.display()));
    let (status, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "a warning is not an error: {stderr}");
    assert!(stdout.contains("configuration OK"));
    let (uid, _) = nobody();
    let warning = format!(
        "warning: listener[0].options.program: {} is writable by uid {uid} (the children's user)",
        bin.path().display()
    );
    assert!(stderr.contains(&warning), "{warning:?} missing from:\n{stderr}");
    // Children as root could signal the root workers: refused.
    write("program = \"/bin/cat\"\nuser = \"root\"");
    let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stderr}");
    assert!(stderr.contains("exec children would run as root"), "{stderr}");
}

#[test]
fn a_child_that_exits_frees_its_instance_at_once() {
    // max_instances = 1, and the first client keeps its socket open after its child exits
    // (the worker then waits up to 5 s for its FIN): the second client is served at once.
    let daemon = exec_daemon(
        1,
        &[("once", "program = \"/bin/echo\"\nargs = [\"hi\"]\nmax_instances = 1")],
        &[],
    );
    let mut first = connect_from(Ipv4Addr::new(127, 0, 4, 1), daemon.addr());
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    // Up to the worker's FIN, sent when the child exits; our socket stays open, so the
    // worker lingers (the access line comes only after).
    let mut output = Vec::new();
    first.read_to_end(&mut output).unwrap();
    assert_eq!(output, b"hi\n");
    assert!(daemon.matching(|l| l.contains("access listener=once")).is_empty(), "still lingering");
    let started = Instant::now();
    let mut second = connect_from(Ipv4Addr::new(127, 0, 4, 2), daemon.addr());
    assert_eq!(
        expect_bytes(&mut second, b"hi\n", Duration::from_secs(2)),
        Outcome::Echoed,
        "refused while the first connection lingers"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    crate::admission::expect_refused(&daemon, "listener-full", 0);
    assert!(started.elapsed() < Duration::from_secs(2), "before the first linger ended");
    drop(first);
}

#[test]
fn stderr_lines_not_logged_are_counted_when_the_child_exits() {
    // 100 lines at once: 20 are logged (the rate limit), and the 80 others are said when the
    // child's stderr ends, with no later line to carry the count.
    let script = "i=0; while [ $i -lt 100 ]; do echo line$i >&2; i=$((i+1)); done";
    let daemon = exec_daemon(
        1,
        &[("noisy", &format!("program = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]"))],
        &[],
    );
    run(&daemon, 0, b"");
    let line = access_line(&daemon, "noisy", 1);
    assert_eq!(field(&line, "stderr_dropped"), Some("80"), "{line}");
    let logged = daemon.matching(|l| l.contains("exec pid=") && l.contains(": line"));
    assert_eq!(logged.len(), 20, "{logged:?}");
    daemon.wait_for_log("the held count", |l| l.contains("80 stderr lines not logged"));
}

#[test]
fn a_dead_spawner_is_started_again_and_its_children_do_not_outlive_it() {
    let daemon = exec_daemon(
        1,
        &[
            ("cat", "program = \"/bin/cat\""),
            ("sleep", "program = \"/bin/sleep\"\nargs = [\"60\"]"),
        ],
        &[],
    );
    let spawner = spawner_pids(&daemon)[0];
    let _held = connect(daemon.addrs[1]);
    eventually("a child runs", || children_of(spawner).len() == 1);
    let child = children_of(spawner)[0];
    kill(Pid::from_raw(spawner), Signal::SIGKILL).unwrap();
    daemon.wait_for_log("the death", |l| {
        l.contains("exec spawner of generation 1") && l.contains("died")
    });
    eventually("the orphaned child was killed", || !is_running(child));
    eventually("a new spawner", || spawner_pids(&daemon).first().is_some_and(|&p| p != spawner));
    // The master is alive and exec serves again.
    assert!(is_running(daemon.pid().as_raw()));
    assert_eq!(run(&daemon, 0, b"again"), b"again");
}

#[test]
fn a_burst_of_connections_all_get_their_child() {
    // 150 clients connect at once, before any exchange: the worker sends 150 requests in a
    // burst, more than a datagram socket's queue (net.unix.max_dgram_qlen) would hold.
    let daemon = exec_daemon(1, &[("cat", "program = \"/bin/cat\"")], &[]);
    let mut streams: Vec<_> = (0..150)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 5, 1 + i as u8), daemon.addr()))
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(exchange(stream, b"burst", PATIENCE), Outcome::Echoed, "client {i}");
    }
    assert!(daemon.matching(|l| l.contains("exec-failed")).is_empty());
}

/// One worker (`workers`) per exec connection: the connection's socket and the reply channel
/// fill a budget of two; the children discard their stderr.
fn one_connection_per_worker(workers: usize) -> Daemon {
    let config = format!(
        "[daemon]\nworkers = {workers}\nmax_connections_per_worker = 2\nallow_root_workers = true\n\
         pid_file = \"@DIR@/p.pid\"\n[log]\nlevel = \"debug\"\n\
         [[listener]]\nname = \"cat\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         [listener.options]\nuser = \"nobody\"\nprogram = \"/bin/cat\"\nstderr = \"discard\"\n"
    );
    Daemon::launch(&config, None, &[])
}

/// The lowest descriptor number process `pid` has free: an `RLIMIT_NOFILE` of that leaves it
/// no room for one more (the limit bounds descriptor numbers).
fn lowest_free_fd(pid: i32) -> usize {
    let open: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !open.contains(fd)).unwrap()
}

/// Sets the soft `RLIMIT_NOFILE` of process `pid` (prlimit(1)).
fn limit_descriptors(pid: i32, soft: usize) {
    let (status, _, stderr) = run_program(
        std::path::Path::new("prlimit"),
        &["--pid", &pid.to_string(), &format!("--nofile={soft}:")],
    );
    assert!(status.success(), "prlimit: {stderr}");
}

#[test]
fn a_spawner_out_of_descriptors_refuses_that_request_and_keeps_serving_the_worker() {
    let daemon = one_connection_per_worker(1);
    let spawner = spawner_pids(&daemon)[0];
    assert_eq!(run(&daemon, 0, b"warm"), b"warm", "the worker's link reached the spawner");
    eventually("the child is reaped", || children_of(spawner).is_empty());
    // The kernel cannot give the spawner the two descriptors a request brings (it closes
    // them): that connection ends.
    limit_descriptors(spawner, lowest_free_fd(spawner));
    let mut refused = connect(daemon.addr());
    assert!(closed_within(&mut refused, PATIENCE), "a request that cannot be served ends");
    drop(refused);
    daemon.wait_until("its close is over", |s| s.workers.iter().all(|w| w.open == 0));
    // Room again: the worker's next request is read (its link was not given up).
    limit_descriptors(spawner, lowest_free_fd(spawner) + 64);
    let mut served = connect(daemon.addr());
    assert_eq!(exchange(&mut served, b"ping", PATIENCE), Outcome::Echoed, "served again");
    assert!(is_running(spawner), "the same spawner");
}

#[test]
fn a_new_workers_link_reaches_a_spawner_out_of_descriptors() {
    let daemon = one_connection_per_worker(1);
    let spawner = spawner_pids(&daemon)[0];
    // The first worker is full with one running child: the next client goes to the next one.
    let mut held = connect(daemon.addr());
    assert_eq!(exchange(&mut held, b"held", PATIENCE), Outcome::Echoed);
    // No room in the spawner when the master passes it the link of a new worker.
    limit_descriptors(spawner, lowest_free_fd(spawner));
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_until("two workers ready", |s| s.ready(1).len() == 2);
    limit_descriptors(spawner, lowest_free_fd(spawner) + 64);
    let mut second = connect(daemon.addr());
    assert_eq!(exchange(&mut second, b"ping", PATIENCE), Outcome::Echoed, "the new worker's link");
    assert_eq!(exchange(&mut held, b"still", PATIENCE), Outcome::Echoed);
    assert!(is_running(spawner), "the same spawner");
}

/// The state letter of process `pid` (proc(5): `R`, `S`, `T` ...).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().next()?.chars().next()
}

#[test]
fn every_spawner_of_a_generation_serves_every_worker() {
    // Two workers, each full with one running child; one spawner per worker where they
    // have a CPU each (`spawner::count`).
    let daemon = one_connection_per_worker(2);
    let spawners = spawner_pids(&daemon);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert_eq!(spawners.len(), cpus.min(2), "{spawners:?}");
    if spawners.len() < 2 {
        // One CPU: one spawner serves both workers; nothing more to show.
        return;
    }
    // One spawner cannot run: the other serves both workers' links, not only "its own".
    let (stopped, serving) = (spawners[0], spawners[1]);
    kill(Pid::from_raw(stopped), Signal::SIGSTOP).unwrap();
    eventually("the spawner is stopped", || process_state(stopped) == Some('T'));
    let mut first = connect(daemon.addr());
    assert_eq!(exchange(&mut first, b"one", PATIENCE), Outcome::Echoed, "first worker");
    // The first worker is full: the next client goes to the other one.
    let mut second = connect(daemon.addr());
    assert_eq!(exchange(&mut second, b"two", PATIENCE), Outcome::Echoed, "second worker");
    let status = daemon.wait_until("both workers hold one", |s| {
        s.workers.len() == 2 && s.workers.iter().all(|w| w.open == 1)
    });
    assert_eq!(children_of(serving).len(), 2, "{status:?}");
    assert!(children_of(stopped).is_empty());
    kill(Pid::from_raw(stopped), Signal::SIGCONT).unwrap();
    // The children's ends reach their workers (from the spawner that started them), and the
    // workers serve again.
    drop((first, second));
    daemon.wait_until("the connections are over", |s| s.workers.iter().all(|w| w.open == 0));
    assert!(is_running(stopped) && is_running(serving), "both spawners run on");
    let mut again = connect(daemon.addr());
    assert_eq!(exchange(&mut again, b"again", PATIENCE), Outcome::Echoed);
}
