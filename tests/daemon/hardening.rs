//! Regressions of the fault-injection and local-attacker review (issue #14): privilege
//! boundaries, bounded operator inputs, control commands that check what they signal.

use std::time::Duration;

use crate::harness::*;

/// How long a command that must not hang may take.
const PROMPT: Duration = Duration::from_secs(5);

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
