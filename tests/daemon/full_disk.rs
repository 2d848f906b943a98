//! A full filesystem under the pid file, and so under the scoreboard beside it (issue 22,
//! item 1): start fails with an error naming the file and the step, and a running daemon
//! survives SIGTTIN and SIGHUP after the filesystem filled up (before, the master died of
//! SIGBUS on the first page of the sparse scoreboard it touched).
//!
//! Each test mounts a tmpfs of its own, which needs root (CI runs as root); elsewhere it says
//! why it does nothing. The mount is lazily unmounted on drop, also when the test fails.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;

use crate::harness::*;

/// A tmpfs mounted on a temporary directory for one test.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8) syntax, such as `1m`); `None`, with the reason
    /// printed, where that is not possible.
    fn mount(size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("note: not root, so no tmpfs can be mounted: nothing tested");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let options = format!("size={size},mode=0755");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(dir.path())
            .status();
        match mounted {
            Ok(status) if status.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!("note: cannot mount a tmpfs here ({other:?}): nothing tested");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full, then gives back `spare` bytes (whole
    /// pages on tmpfs).
    fn fill(&self, spare: u64) {
        let path = self.path().join("filler");
        let mut filler = OpenOptions::new().create_new(true).write(true).open(&path).unwrap();
        let chunk = [0xa5u8; 4096];
        // Bounded: a tmpfs of a few MiB fills in a few thousand writes.
        for _ in 0..1_000_000 {
            match filler.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let written = filler.metadata().unwrap().len();
        filler.set_len(written.saturating_sub(spare)).unwrap();
        let probe = self.path().join("probe");
        if spare == 0 {
            let full = std::fs::write(&probe, [1u8; 4096]).unwrap_err();
            assert_eq!(full.raw_os_error(), Some(nix::libc::ENOSPC), "the filesystem is full");
        }
    }

    /// Names of the files in the filesystem, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process of a failed test still holding a file cannot keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn config_with_pid_file(fs: &Tmpfs) -> String {
    let pid_file = format!("pid_file = \"{}/preforkd.pid\"", fs.path().display());
    echo_config(1, &pid_file, "")
}

#[test]
fn a_full_filesystem_under_the_scoreboard_fails_the_start_with_the_file_and_the_step() {
    let Some(fs) = Tmpfs::mount("1m") else { return };
    // Room for the pid file, not for a scoreboard of a few hundred KiB.
    fs.fill(64 << 10);
    let mut daemon = Daemon::spawn(&[], &config_with_pid_file(&fs), None, &[]);
    let status = daemon.wait_exit(PATIENCE).expect("the master exits");
    assert!(
        status.code().is_some_and(|code| code != 0),
        "an error exit, not a signal: {status:?}\n{:#?}",
        daemon.lines()
    );
    let board = fs.path().join("preforkd.pid.scoreboard");
    let line = daemon.wait_for_log("the error naming the scoreboard and the step", |l| {
        l.contains(&format!("scoreboard {}: could not allocate", board.display()))
    });
    assert!(line.contains("No space left on device"), "{line}");
    assert!(
        !fs.names().iter().any(|n| n.contains("scoreboard")),
        "nothing of the scoreboard is left: {:?}",
        fs.names()
    );
}

#[test]
fn a_running_daemon_survives_ttin_and_hup_after_its_filesystem_filled_up() {
    let Some(fs) = Tmpfs::mount("1m") else { return };
    let daemon = Daemon::start(&config_with_pid_file(&fs));
    let master = daemon.pid().as_raw();
    fs.fill(0);
    // A new worker's slot and, at the reload, a new generation's slots: pages of the
    // scoreboard the master had not touched before.
    daemon.signal(Signal::SIGTTIN);
    daemon.wait_until("a second worker", |s| s.master.target_workers == 2 && s.serving());
    daemon.signal(Signal::SIGHUP);
    daemon.wait_generation(2);
    assert!(is_running(master), "the master lives");
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"still here\n", PATIENCE), Outcome::Echoed);
    let (status, stdout, stderr) = daemon.control("status");
    assert!(status.success(), "status reads the scoreboard: {stdout}{stderr}");
    assert!(stdout.contains("generation 2"), "{stdout}");
}
