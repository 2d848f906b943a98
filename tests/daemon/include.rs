//! `include = ["conf.d/*.toml"]`: listeners from files of their own, read in name order,
//! their problems located in their own file, read again by a reload.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;

use crate::harness::*;

fn listener(name: &str, service: &str, extra: &str) -> String {
    format!(
        "# {name}\n[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nservice = \"{service}\"\n{extra}"
    )
}

fn main_file(conf_d: &Path) -> String {
    format!(
        "include = [\"{}/*.toml\"]\n[daemon]\nworkers = 1\nallow_root_workers = true\n\
         pid_file = \"@DIR@/preforkd.pid\"\n[log]\nlevel = \"debug\"\n",
        conf_d.display()
    )
}

#[test]
fn a_problem_in_the_second_included_file_is_reported_at_its_own_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(conf_d.join("10-echo.toml"), listener("echo", "echo", "")).unwrap();
    // Line 6, column 11: the value of backlog.
    std::fs::write(conf_d.join("20-discard.toml"), listener("discard", "discard", "backlog = 0\n"))
        .unwrap();
    let main = dir.path().join("preforkd.toml");
    std::fs::write(&main, main_file(&conf_d).replace("@DIR@", dir.path().to_str().unwrap()))
        .unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", main.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stdout}{stderr}");
    let expected = format!(
        "{}:6:11: listener[1].backlog: 0 is out of range",
        conf_d.join("20-discard.toml").display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // Fixed, both files' listeners are in: 10- before 20-, as their names sort.
    std::fs::write(conf_d.join("20-discard.toml"), listener("discard", "discard", "")).unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", main.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stdout}{stderr}");
}

/// The address listener `name` is bound to, once it is.
fn listening(daemon: &Daemon, name: &str) -> SocketAddr {
    let status =
        daemon.wait_until(&format!("listener {name} bound"), |s| s.address(name).is_some());
    status.address(name).unwrap()
}

#[test]
fn a_reload_reads_the_directory_again_and_serves_a_file_added_since() {
    let dir = tempfile::tempdir().unwrap();
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(conf_d.join("b.toml"), listener("second", "echo", "")).unwrap();
    std::fs::write(conf_d.join("a.toml"), listener("first", "echo", "")).unwrap();
    let mut daemon = Daemon::start(&main_file(&conf_d));
    // Read in name order: a.toml's listener first.
    assert_eq!(daemon.addrs.len(), 2, "{:?}", daemon.lines());
    assert_eq!(daemon.addrs[0], listening(&daemon, "first"));
    for addr in daemon.addrs.clone() {
        let mut stream = connect(addr);
        assert_eq!(exchange(&mut stream, b"included", PATIENCE), Outcome::Echoed);
    }

    std::fs::write(conf_d.join("c.toml"), listener("third", "daytime", "")).unwrap();
    let (status, stdout, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    let mut stream = connect(listening(&daemon, "third"));
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with("\r\n") && answer.len() > 10, "a daytime: {answer:?}");

    let (status, _, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exited")), 0);
}
