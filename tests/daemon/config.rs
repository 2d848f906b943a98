//! `check`, `-t`, and startup on invalid configurations.

use std::process::{Command, Stdio};

use crate::harness::*;

const BROKEN: &str = r#"colour = "blue"
[daemon]
workers = 0
graceful_timeout = "soon"
allow_root_workers = true
[[listener]]
name = "echo"
address = "127.0.0.1:0"
service = "gopher"
backlog = -1
[[listener]]
name = "second"
address = "not-an-address"
service = "echo"
"#;

const PROBLEMS: &[&str] = &[
    ":1:1: colour: unknown field `colour`",
    ":3:11: daemon.workers: 0 is out of range",
    ":4:20: daemon.graceful_timeout: invalid duration",
    ":9:11: listener[0].service: unknown service \"gopher\"",
    ":10:11: listener[0].backlog: -1 is out of range",
    ":13:11: listener[1].address: \"not-an-address\" is not an address",
];

fn assert_lists_every_problem(stderr: &str) {
    for problem in PROBLEMS {
        assert!(stderr.contains(problem), "{problem:?} missing from:\n{stderr}");
    }
    let lines = stderr.lines().filter(|l| l.contains(".toml:")).count();
    assert_eq!(lines, PROBLEMS.len(), "one line per problem:\n{stderr}");
}

#[test]
fn check_and_startup_list_every_problem_and_exit_78_binding_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, BROKEN).unwrap();
    let path = path.to_str().unwrap();

    let (status, stdout, stderr) = run_cli(&["check", "-c", path]);
    assert_eq!(code(status), 78);
    assert!(!stdout.contains("OK"));
    assert_lists_every_problem(&stderr);

    let (status, _, stderr) = run_cli(&["-t", "-c", path]);
    assert_eq!(code(status), 78);
    assert_lists_every_problem(&stderr);

    let (status, _, stderr) = run_cli(&["-c", path]);
    assert_eq!(code(status), 78, "startup refuses an invalid config");
    assert_lists_every_problem(&stderr);
    assert!(!stderr.contains("listening on"), "nothing may be bound:\n{stderr}");
}

#[test]
fn the_shipped_config_is_valid() {
    // As root, `check` resolves daemon.user, which the shipped sysusers.d file creates.
    ensure_preforkd_user();
    let shipped = repo_file("config/preforkd.toml");
    let (status, stdout, stderr) = run_cli(&["check", "-c", shipped.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
}

#[test]
fn help_says_what_preforkd_is_and_names_every_service() {
    let (status, stdout, _) = run_cli(&["--help"]);
    assert_eq!(code(status), 0);
    assert!(stdout.contains("TCP and UDP") && stdout.contains("epoll"), "{stdout}");
    let services = stdout.lines().find(|l| l.starts_with("Services: ")).unwrap_or_default();
    for name in preforkd::services::Registry::builtin().names() {
        assert!(services.contains(name), "--help does not name {name}: {stdout}");
    }
}

#[test]
fn unreadable_config_and_bad_arguments_have_their_own_status() {
    let (status, _, stderr) = run_cli(&["check", "-c", "/nonexistent/preforkd.toml"]);
    assert_eq!(code(status), 66, "{stderr}");
    assert!(stderr.contains("could not read configuration /nonexistent/preforkd.toml"), "{stderr}");
    let (status, _, _) = run_cli(&["--no-such-flag"]);
    assert_eq!(code(status), 64);
}

#[test]
fn a_taken_address_fails_startup_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config =
        echo_config(1, "", "").replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(BINARY).arg("-c").arg(&path).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(code(output.status), 69, "{stderr}");
    let expected = format!(
        "could not bind {} (listener echo): Address already in use",
        taken.local_addr().unwrap()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}
