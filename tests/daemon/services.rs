//! The session API from a service's side, through a test-only service.

use std::io::Read;

use crate::harness::*;

/// Descriptors a process has open, from /proc.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

#[test]
fn a_session_can_watch_a_descriptor_set_a_timer_and_name_its_close() {
    let config = "[daemon]\nworkers = 1\nallow_root_workers = true\n\
                  [log]\nlevel = \"debug\"\n\
                  [[listener]]\nname = \"probe\"\naddress = \"127.0.0.1:0\"\nservice = \"test-probe\"\n";
    let daemon = Daemon::launch(config, None, &[("PREFORKD_TEST_SERVICES", "1")]);
    let worker = daemon.worker_pids()[0];
    let before = open_fds(worker);
    for round in 0..20 {
        let mut stream = connect(daemon.addr());
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "probe: pipe, timer\n", "round {round}");
    }
    let lines =
        daemon.wait_for_lines("20 access lines", 20, |l| l.contains("access listener=probe"));
    for line in &lines {
        assert_eq!(field(line, "reason"), Some("probe-done"), "{line}");
        assert_eq!(field(line, "in"), Some("1"), "the pipe's byte counts as input: {line}");
    }
    eventually("every descriptor is closed again", || open_fds(worker) == before);
}
