//! `preforkd import xinetd`: Debian's xinetd files and a sample of real services convert,
//! pass `check`, run, and answer real clients as xinetd would; what has no equivalent is
//! reported with its file and line.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Runs a real client to completion within [`PATIENCE`], killing it after.
fn run(program: &str, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed for this test (.ci/run installs it): {e}"));
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{program} {args:?} did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

fn succeeded(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `preforkd import xinetd PATH`: (stdout, stderr).
fn import(path: &Path) -> (String, String) {
    let (status, stdout, stderr) = run_cli(&["import", "xinetd", path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "{stderr}");
    (stdout, stderr)
}

/// The converted file made runnable here: every address on 127.0.0.1:0, two workers and a
/// pid file; as root, the workers' and exec's default users created as the package would.
fn runnable(converted: &str) -> String {
    let mut text = String::new();
    for line in converted.lines() {
        if line.starts_with("address = ") {
            text.push_str("address = \"127.0.0.1:0\"\n");
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    ensure_preforkd_user();
    crate::newcomer::ensure_exec_user();
    text.replace("[daemon]\n", "[daemon]\nworkers = 2\npid_file = \"@DIR@/p.pid\"\n")
}

fn check_accepts(config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("converted.toml");
    std::fs::write(&path, config.replace("@DIR@", dir.path().to_str().unwrap())).unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 0, "check: {stdout}{stderr}\n{config}");
}

/// The address listener `name` is bound to.
fn address(daemon: &Daemon, name: &str) -> SocketAddr {
    let status = daemon.status().expect("the daemon answers");
    status.address(name).unwrap_or_else(|| panic!("no listener {name}: {status:#?}"))
}

#[test]
fn debians_xinetd_files_convert_check_and_serve_as_xinetd_would() {
    let xinetd_d = Path::new("/etc/xinetd.d");
    assert!(xinetd_d.is_dir(), "the xinetd package's files (.ci/run installs xinetd)");
    // A copy with every service enabled (Debian ships them disabled).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("xinetd.d");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(xinetd_d).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let enabled: String = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("disable") {
                    "\tdisable = no\n".to_owned()
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(copy.join(path.file_name().unwrap()), enabled).unwrap();
    }
    let main = dir.path().join("xinetd.conf");
    let text = std::fs::read_to_string("/etc/xinetd.conf").unwrap();
    std::fs::write(&main, text.replace("/etc/xinetd.d", copy.to_str().unwrap())).unwrap();

    // As shipped (disabled): every service is there, commented out.
    let (shipped, _) = import(Path::new("/etc/xinetd.conf"));
    assert!(shipped.contains("# [[listener]]\n# name = \"echo-stream\"\n"), "{shipped}");
    assert!(!shipped.lines().any(|l| l == "[[listener]]"), "nothing enabled: {shipped}");

    let (converted, notes) = import(&main);
    for expected in [
        "chargen-udp:4: service: chargen is not converted: chargen over UDP",
        "discard-udp:4: service: discard is not converted: discard over UDP",
        "servers:4: service: servers is not converted",
        "services:4: service: services is not converted",
        "echo-udp:4: id: id echo-dgram is already the service of",
    ] {
        assert!(notes.contains(expected), "{expected:?} missing from:\n{notes}");
    }
    let config = runnable(&converted);
    check_accepts(&config);
    let daemon = Daemon::start(&config);

    let mut echo = connect(address(&daemon, "echo-stream"));
    assert_eq!(exchange(&mut echo, b"as xinetd's echo", PATIENCE), Outcome::Echoed);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.send_to(b"datagram", address(&daemon, "echo-dgram")).unwrap();
    let mut buf = [0u8; 64];
    let n = uninterrupted(|| udp.recv(&mut buf)).unwrap();
    assert_eq!(&buf[..n], b"datagram");
    // time (RFC 868) with a real client, both transports; daytime (RFC 867) with nc.
    for (name, udp) in [("time-stream", false), ("time-dgram", true)] {
        let port = address(&daemon, name).port().to_string();
        let mut args = vec!["-p", "-o", &port];
        if udp {
            args.push("-u");
        }
        args.push("127.0.0.1");
        let printed = succeeded(run("rdate", &args), "rdate");
        assert!(printed.contains(&time_year()), "{name}: {printed}");
    }
    let port = address(&daemon, "daytime-stream").port().to_string();
    let daytime = succeeded(run("nc", &["-N", "127.0.0.1", &port]), "nc");
    assert!(daytime.contains(&time_year()) && daytime.ends_with("\r\n"), "{daytime:?}");
    let mut chargen = connect(address(&daemon, "chargen-stream"));
    let mut line = [0u8; 74];
    chargen.set_read_timeout(Some(PATIENCE)).unwrap();
    chargen.read_exact(&mut line).unwrap();
    assert!(line[..72].iter().all(|b| (b' '..=b'~').contains(b)), "RFC 864: {line:?}");
    assert_eq!(&line[72..], b"\r\n", "a line of 72 characters");
    let mut discard = connect(address(&daemon, "discard-stream"));
    discard.write_all(b"into the void").unwrap();
    discard.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_within(&mut discard, PATIENCE), "discard answers nothing and closes");
}

/// This year, as the time services print it.
fn time_year() -> String {
    let output = Command::new("date").arg("+%Y").output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_sample_of_real_services_converts_runs_and_answers_their_clients() {
    let git_path = ["/usr/bin/git", "/usr/local/bin/git"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("git (.ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let root = dir.path();
    // A git repository with one commit.
    let srv = root.join("git");
    std::fs::create_dir(&srv).unwrap();
    let git = |args: &[&str], cwd: &Path| {
        let out = Command::new("git").args(args).current_dir(cwd).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    git(&["init", "-q", "-b", "main", "demo.git"], &srv);
    std::fs::write(srv.join("demo.git/README"), "served by preforkd\n").unwrap();
    git(&["add", "README"], &srv.join("demo.git"));
    git(
        &["-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "c"],
        &srv.join("demo.git"),
    );
    // The service's user owns its repositories, as git daemon wants (xinetd's `user`).
    if nix::unistd::geteuid().is_root() {
        let chown = Command::new("chown").args(["-R", "nobody"]).arg(&srv).status().unwrap();
        assert!(chown.success());
    }
    // An rsync module.
    let files = root.join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("hello.txt"), "hello over rsync\n").unwrap();
    let rsyncd = root.join("rsyncd.conf");
    std::fs::write(
        &rsyncd,
        format!("use chroot = no\n[files]\npath = {}\nread only = yes\n", files.display()),
    )
    .unwrap();
    // A TFTP root.
    let tftp_root = root.join("tftp");
    std::fs::create_dir(&tftp_root).unwrap();
    std::fs::write(tftp_root.join("boot.img"), vec![7u8; 3000]).unwrap();
    // The redirect's backend: says hello, then echoes.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = backend.accept() {
            let _ = stream.write_all(b"backend here\n");
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let refused = root.join("refused.txt");
    std::fs::write(&refused, "not for you\r\n").unwrap();

    let xinetd = root.join("xinetd.conf");
    let conf = format!(
        "defaults\n{{\n\tinstances = 20\n\tlog_on_success = PID HOST DURATION EXIT\n}}\n\n\
         service git\n{{\n\tsocket_type = stream\n\tprotocol = tcp\n\twait = no\n\tuser = nobody\n\
         \tserver = {git_path}\n\tserver_args = daemon --inetd --export-all --base-path={srv} {srv}\n}}\n\n\
         service rsync\n{{\n\tsocket_type = stream\n\twait = no\n\tuser = nobody\n\
         \tserver = /usr/bin/rsync\n\tserver_args = --daemon --config={rsyncd}\n}}\n\n\
         service smtp-relay\n{{\n\ttype = UNLISTED\n\tsocket_type = stream\n\twait = no\n\
         \tport = 7001\n\tredirect = 127.0.0.1 {backend_port}\n}}\n\n\
         service tftp\n{{\n\tsocket_type = dgram\n\tprotocol = udp\n\twait = yes\n\tuser = root\n\
         \tserver = /usr/sbin/in.tftpd\n\tserver_args = -s {tftp}\n}}\n\n\
         service echo\n{{\n\ttype = INTERNAL UNLISTED\n\tid = guarded\n\tport = 7002\n\
         \tsocket_type = stream\n\twait = no\n\tonly_from = 127.0.0.1 127.0.0.3\n\tper_source = 1\n\
         \tinstances = 4\n\tbanner_fail = {refused}\n}}\n\n\
         service daytime\n{{\n\ttype = INTERNAL\n\tsocket_type = stream\n\twait = no\n\
         \taccess_times = 08:00-17:00\n}}\n",
        srv = srv.display(),
        rsyncd = rsyncd.display(),
        tftp = tftp_root.display(),
        refused = refused.display(),
    );
    std::fs::write(&xinetd, &conf).unwrap();
    let (converted, notes) = import(&xinetd);
    let access_times = conf.lines().position(|l| l.contains("access_times")).unwrap() + 1;
    let expected = format!("{}:{access_times}: access_times: no equivalent", xinetd.display());
    assert!(notes.contains(&expected), "{expected:?} missing from:\n{notes}");
    // in.tftpd ran as its `user`; the built-in tftp runs in the workers.
    let tftp_user = conf.lines().enumerate().find(|(_, l)| l.contains("user = root"));
    let expected = format!(
        "{}:{}: user: user = root: the service runs in preforkd's workers",
        xinetd.display(),
        tftp_user.unwrap().0 + 1
    );
    assert!(notes.contains(&expected), "{expected:?} missing from:\n{notes}");
    assert_eq!(notes.lines().count(), 2, "nothing else is left out:\n{notes}");
    for origin in ["service git, ", "service rsync, ", "service tftp, ", "service echo, "] {
        assert!(converted.contains(origin), "{origin} in a comment:\n{converted}");
    }
    let parsed: toml::Table = toml::from_str(&converted).unwrap();
    let git = &parsed["listener"][0]["options"];
    assert_eq!(git["user"].as_str(), Some("nobody"), "xinetd's user, exec's: {converted}");
    assert_eq!(git["groups"].as_array().map(Vec::len), Some(0), "groups = no, xinetd's default");
    assert_eq!(git["max_instances"].as_integer(), Some(20), "the defaults' instances");

    let config = runnable(&converted);
    check_accepts(&config);
    let daemon = Daemon::start(&config);

    // git daemon, through exec.
    let url = format!("git://{}/demo.git", address(&daemon, "git"));
    let out = run("git", &["clone", "-q", &url, root.join("clone").to_str().unwrap()]);
    succeeded(out, "git clone");
    assert_eq!(std::fs::read_to_string(root.join("clone/README")).unwrap(), "served by preforkd\n");
    // rsync daemon, through exec.
    let url = format!("rsync://127.0.0.1:{}/files/hello.txt", address(&daemon, "rsync").port());
    let fetched = root.join("fetched.txt");
    succeeded(run("rsync", &[&url, fetched.to_str().unwrap()]), "rsync");
    assert_eq!(std::fs::read_to_string(&fetched).unwrap(), "hello over rsync\n");
    // redirect, through the relay.
    let mut relayed = connect(address(&daemon, "smtp-relay"));
    let mut hello = [0u8; 13];
    relayed.set_read_timeout(Some(PATIENCE)).unwrap();
    relayed.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"backend here\n");
    assert_eq!(exchange(&mut relayed, b"relayed", PATIENCE), Outcome::Echoed);
    // in.tftpd -s, as the built-in tftp.
    let port = address(&daemon, "tftp").port().to_string();
    let copy = root.join("boot.copy");
    let out = run(
        "tftp",
        &["-m", "octet", "127.0.0.1", &port, "-c", "get", "boot.img", copy.to_str().unwrap()],
    );
    succeeded(out, "tftp");
    assert_eq!(std::fs::read(&copy).unwrap(), vec![7u8; 3000]);
    // only_from + per_source + banner_fail.
    let guarded = address(&daemon, "guarded");
    let mut allowed = connect(guarded);
    assert_eq!(exchange(&mut allowed, b"let in", PATIENCE), Outcome::Echoed);
    let refused_with = |stream: &mut TcpStream| {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut all = Vec::new();
        let _ = stream.read_to_end(&mut all);
        all
    };
    let mut second = connect(guarded);
    assert_eq!(refused_with(&mut second), b"not for you\r\n", "over per_source");
    let mut stranger = connect_from(Ipv4Addr::new(127, 0, 0, 2), guarded);
    assert_eq!(refused_with(&mut stranger), b"not for you\r\n", "not in only_from");
    let mut friend = connect_from(Ipv4Addr::new(127, 0, 0, 3), guarded);
    assert_eq!(exchange(&mut friend, b"in only_from", PATIENCE), Outcome::Echoed);
    // The service with an attribute left out runs all the same.
    let port = address(&daemon, "daytime").port().to_string();
    let daytime = succeeded(run("nc", &["-N", "127.0.0.1", &port]), "nc");
    assert!(daytime.ends_with("\r\n"), "{daytime:?}");
}
