//! The syslog target, against a test-owned syslog socket.

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

#[test]
fn syslog_target_sends_rfc3164_with_facility_and_each_process_pid() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("log.sock");
    let syslog = UnixDatagram::bind(&socket_path).unwrap();
    syslog.set_read_timeout(Some(PATIENCE)).unwrap();
    let config = echo_config(2, "", "").replace(
        "[log]\n",
        &format!(
            "[log]\ntarget = \"syslog\"\nfacility = \"local3\"\nsyslog_socket = {:?}\n",
            socket_path.to_str().unwrap()
        ),
    );
    let config_path = dir.path().join("preforkd.toml");
    std::fs::write(&config_path, config).unwrap();
    let child = Command::new(BINARY)
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut daemon = GroupGuard(child);
    let master = daemon.0.id();

    let deadline = Instant::now() + PATIENCE;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 8192];
    let complete = |messages: &[String]| {
        messages.iter().filter(|m| m.contains("worker started")).count() == 2
            && messages.iter().any(|m| m.contains("master started"))
    };
    while !complete(&messages) {
        assert!(Instant::now() < deadline, "no worker start in syslog: {messages:#?}");
        let n = uninterrupted(|| syslog.recv(&mut buf)).expect("a syslog datagram");
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // local3 (19) * 8 + info (6) = 158; debug is 159.
    let started = messages.iter().find(|m| m.contains("master started")).expect("master line");
    assert!(started.starts_with("<158>"), "{started}");
    assert!(started.contains(&format!("preforkd[{master}]: master pid={master}: ")), "{started}");
    for line in messages.iter().filter(|m| m.contains("worker started")) {
        let pid = pid_of(line);
        assert_ne!(pid as u32, master);
        assert!(
            line.contains(&format!("preforkd[{pid}]: worker=")),
            "workers log under their own pid: {line}"
        );
    }
    kill(Pid::from_raw(master as i32), Signal::SIGTERM).unwrap();
    let status = daemon.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn an_unreachable_syslog_socket_fails_startup_with_69() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.sock");
    let config = echo_config(1, "", "").replace(
        "[log]\n",
        &format!("[log]\ntarget = \"syslog\"\nsyslog_socket = {:?}\n", missing.to_str().unwrap()),
    );
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config).unwrap();
    let (status, _, stderr) = run_cli(&["-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 69, "{stderr}");
    assert!(stderr.contains("could not connect to syslog"), "{stderr}");
}
