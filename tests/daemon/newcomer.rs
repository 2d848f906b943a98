//! A newcomer's first steps, each of which once went wrong on main: the README's exec example,
//! `check` finding everything in one run, the hints a refusal gives, what `-d` says on the
//! terminal, and documents that say what the code does.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

/// A file with 14 problems, 4 of which `check` once found only after the other 10 were
/// fixed: tftp over TCP (its options are invalid too), an unknown user, a pid directory that
/// cannot be made, and an address of no local interface.
const FOURTEEN: &str = r#"colour = "blue"

[daemon]
workers = 0
graceful_timeout = "soon"
user = "no-such-user-preforkd"
pid_file = "/nonexistent-preforkd/deeper/preforkd.pid"

[log]
level = "loud"

[[listener]]
name = "echo"
address = "192.0.2.1:7"
service = "echo"
backlog = 0

[[listener]]
name = "tftp"
address = "127.0.0.1:0"
service = "tftp"
max_connections_per_client = -1
[listener.options]
root = "srv/tftp"

[[listener]]
name = "echo"
address = "localhost:7"
service = "gopher"
"#;

#[test]
fn check_lists_all_fourteen_problems_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, FOURTEEN).unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stdout}{stderr}");
    let root = nix::unistd::geteuid().is_root();
    let mut expected = vec![
        "broken.toml:1:1: colour: unknown field",
        "broken.toml:4:11: daemon.workers: 0 is out of range",
        "broken.toml:5:20: daemon.graceful_timeout: invalid duration",
        "broken.toml:7:12: daemon.pid_file: directory /nonexistent-preforkd/deeper",
        "broken.toml:10:9: log.level: unknown value \"loud\"",
        "broken.toml:14:11: listener[0].address: could not bind 192.0.2.1:7",
        "broken.toml:16:11: listener[0].backlog: 0 is out of range",
        "broken.toml:18:1: listener[1].transport: service \"tftp\" cannot serve TCP",
        "broken.toml:22:30: listener[1].max_connections_per_client: -1 is out of range",
        "broken.toml:24:8: listener[1].options.root: must be an absolute path",
        "broken.toml:27:8: listener[2].name: duplicate listener name \"echo\"",
        "broken.toml:28:11: listener[2].address: \"localhost:7\" is not an address",
        "broken.toml:29:11: listener[2].service: unknown service \"gopher\"",
    ];
    if root {
        expected.insert(3, "broken.toml:6:8: daemon.user: unknown user \"no-such-user-preforkd\"");
    } else {
        eprintln!("the unknown user is a problem for a root master only (CI runs as root)");
    }
    let lines: Vec<&str> = stderr.lines().collect();
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(line.contains(expected), "{expected:?} is not {line:?}:\n{stderr}");
    }
    assert_eq!(lines.len(), if root { 14 } else { 13 }, "{stderr}");
}

#[test]
fn status_names_the_file_check_should_be_run_on() {
    let daemon = Daemon::start(&controlled_config(1, "", ""));
    let valid = std::fs::read_to_string(&daemon.config_path).unwrap();
    std::fs::write(&daemon.config_path, valid.replace("workers = 1", "workers = 0")).unwrap();
    let (status, _, stderr) = daemon.control("status");
    assert_eq!(code(status), 0, "{stderr}");
    let hint = format!("`preforkd check -c {}` lists why", daemon.config_path.display());
    assert!(stderr.contains(&hint), "{stderr}");
}

#[test]
fn run_with_an_unknown_user_gives_the_hint_check_gives() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: daemon.user matters to a root master only (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preforkd.toml");
    let config = echo_config(1, "user = \"no-such-user-preforkd\"", "")
        .replace("allow_root_workers = true\n", "");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let hint = "unknown user \"no-such-user-preforkd\": workers cannot switch to it (create it, \
                e.g. with systemd-sysusers or useradd --system)";
    let (status, _, stderr) = run_cli_within(&["-c", path], PATIENCE).expect("startup ends");
    assert_eq!(code(status), 78, "{stderr}");
    assert!(stderr.contains(&format!("daemon.user: {hint}")), "{stderr}");
    let (status, _, stderr) = run_cli(&["check", "-c", path]);
    assert_eq!(code(status), 78, "{stderr}");
    assert!(stderr.contains(hint), "{stderr}");
}

#[test]
fn daemon_mode_says_on_the_terminal_why_it_did_not_start() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = echo_config(1, "", "")
        .replace("127.0.0.1:0", &address.to_string())
        .replace("[log]\n", "[log]\ntarget = \"file\"\npath = \"@DIR@/preforkd.log\"\n")
        .replace("@DIR@", dir.path().to_str().unwrap());
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config).unwrap();
    let (status, _, stderr) =
        run_cli_within(&["-d", "-c", path.to_str().unwrap()], PATIENCE).expect("-d returns");
    assert_eq!(code(status), 69, "{stderr}");
    assert!(
        stderr
            .contains(&format!("could not bind {address} (listener echo): Address already in use")),
        "the reason, on the terminal: {stderr:?}"
    );
}

#[test]
fn a_missing_pid_directory_is_made_as_systemd_would_make_it() {
    let mut daemon = Daemon::start(&echo_config(1, "pid_file = \"@DIR@/run/preforkd.pid\"", ""));
    assert!(daemon.dir().join("run/preforkd.pid").is_file(), "the pid file, in a new directory");
    let (status, stdout, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exited")), 0);
}

/// As root: makes sure exec's default user (`preforkd-exec`) exists, from the shipped
/// sysusers.d file, as the package creates it (idempotent).
pub fn ensure_exec_user() {
    if nix::unistd::User::from_name("preforkd-exec").unwrap().is_some() {
        return;
    }
    let sysusers = repo_file("systemd/preforkd.sysusers");
    let made = Command::new("systemd-sysusers").arg(&sysusers).status();
    if !made.is_ok_and(|s| s.success()) {
        // Without systemd-sysusers: what the sysusers.d line says, with useradd.
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell"])
            .args(["/usr/sbin/nologin", "--comment", "preforkd exec programs", "preforkd-exec"])
            .status()
            .expect("run useradd");
        assert!(status.success(), "could not create the preforkd-exec user");
    }
}

/// The program `name` on the PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The first ```toml block after `marker` in the README.
fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let after = &readme[readme.find(marker).expect(marker)..];
    let start = after.find("```toml\n").expect("a toml block") + "```toml\n".len();
    after[start..start + after[start..].find("```").unwrap()].to_owned()
}

fn git(args: &[&str], dir: &Path) {
    let output = Command::new("git").args(args).current_dir(dir).output().expect("run git");
    assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn the_readme_git_daemon_example_serves_a_root_owned_repository() {
    let git_path = on_path("git").expect("git is installed (.ci/run installs it)");
    let root = nix::unistd::geteuid().is_root();
    // As root, the child runs as another user than the repository's owner, the case git
    // refuses without safe.directory.
    let user = match ensure_preforkd_user() {
        Some(_) => {
            ensure_exec_user();
            "user = \"preforkd\"\n"
        }
        None => {
            eprintln!("not root: the child runs as the repository's owner, a weaker test");
            ""
        }
    };
    let srv = tempfile::tempdir().unwrap();
    std::fs::set_permissions(srv.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let srv_git = srv.path().join("git");
    std::fs::create_dir(&srv_git).unwrap();
    let work = tempfile::tempdir().unwrap();
    // The README's steps, then a commit to fetch.
    git(&["init", "-q", "--bare", srv_git.join("demo.git").to_str().unwrap()], work.path());
    std::fs::write(srv_git.join("demo.git/git-daemon-export-ok"), "").unwrap();
    git(&["init", "-q", "-b", "main", "src"], work.path());
    std::fs::write(work.path().join("src/hello"), "hello from preforkd\n").unwrap();
    let src = work.path().join("src");
    git(&["add", "hello"], &src);
    git(&["-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "hi"], &src);
    // To the branch the bare repository's HEAD names, whatever git's default is here.
    let head = std::fs::read_to_string(srv_git.join("demo.git/HEAD")).unwrap();
    let branch = head.trim().trim_start_matches("ref: ");
    git(
        &["push", "-q", srv_git.join("demo.git").to_str().unwrap(), &format!("main:{branch}")],
        &src,
    );
    if root {
        assert_eq!(
            std::fs::metadata(srv_git.join("demo.git"))
                .map(|m| { std::os::unix::fs::MetadataExt::uid(&m) })
                .unwrap(),
            0,
            "root owns the repository"
        );
    }

    let block = readme_block("A git server for the repositories under")
        .replace("127.0.0.1:9418", "127.0.0.1:0")
        .replace("/usr/bin/git", git_path.to_str().unwrap())
        .replace("/srv/git", srv_git.to_str().unwrap());
    let config = format!(
        "[daemon]\nworkers = 1\nallow_root_workers = true\n{user}[log]\nlevel = \"debug\"\n{block}"
    );
    let daemon = Daemon::start(&config);
    let url = format!("git://{}/demo.git", daemon.addr());
    let output = Command::new("git")
        .args(["clone", "-q", &url, "clone"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "git clone: {}", String::from_utf8_lossy(&output.stderr));
    let cloned = std::fs::read_to_string(work.path().join("clone/hello")).unwrap();
    assert_eq!(cloned, "hello from preforkd\n");

    // A request for what is not served: git daemon's complaint reaches preforkd's log.
    let output = Command::new("git")
        .args(["ls-remote", &format!("git://{}/missing.git", daemon.addr())])
        .output()
        .unwrap();
    assert!(!output.status.success());
    daemon.wait_for_log("git daemon's own message, with the child's pid", |l| {
        l.contains("missing.git") && l.contains("exec pid=")
    });
}

#[test]
fn the_readme_security_figure_is_what_systemd_analyze_prints() {
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let at = readme.find("`systemd-analyze security --offline=yes` rates it").expect("the claim");
    let claim = &readme[at..at + 200];
    let figure = claim.split("**").nth(1).expect("a bold figure").split(' ').next().unwrap();
    let version = claim.split("(systemd ").nth(1).unwrap().split(';').next().unwrap();
    let installed = Command::new("systemd-analyze").arg("--version").output().unwrap();
    let installed = String::from_utf8_lossy(&installed.stdout).to_string();
    if !installed.starts_with(&format!("systemd {version} ")) {
        eprintln!("skipped: the README's figure is systemd {version}'s, this is {installed}");
        return;
    }
    let unit = repo_file("systemd/preforkd.service");
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", unit.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).expect(&text);
    let measured = line.split(": ").nth(1).unwrap().split(' ').next().unwrap();
    assert_eq!(figure, measured, "README: {claim:?}; systemd-analyze: {line}");
}

#[test]
fn man_pages_render_quotes_unnested() {
    for page in ["man/preforkd.8", "man/preforkd.toml.5"] {
        let output = Command::new("mandoc")
            .args(["-Tascii", "-Owidth=300", repo_file(page).to_str().unwrap()])
            .output()
            .expect("mandoc (.ci/run installs it)");
        // Overstrike (bold, underline) removed: "X\bX" is X.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&output.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        for line in text.lines() {
            // `Qq a | Qq b` nested: "a | "b"" (an empty string, "", is fine).
            assert!(!line.contains("\"\"\""), "{page}: nested quotes in {line:?}");
            for (at, _) in line.match_indices(" | \"") {
                let open = line[..at].matches('"').count() % 2 == 1;
                assert!(!open, "{page}: a quote still open before '|' in {line:?}");
            }
        }
    }
}

#[test]
fn the_example_runs_its_workers_as_preforkd_not_nobody() {
    let example = std::fs::read_to_string(repo_file("examples/upper.toml")).unwrap();
    assert!(example.lines().any(|l| l == "user = \"preforkd\""), "{example}");
    assert!(!repo_file("sth.txt").exists(), "no stray empty file at the root");
}
