//! Banners (`banner`, `banner_fail`) and the variables an `allow` rule gives exec's
//! programs, as xinetd and tcpserver/tcprules offer them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use socket2::{Domain, Socket, Type};

use crate::harness::*;

/// Everything the server sends until it closes.
fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    all
}

#[test]
fn an_admitted_client_is_greeted_before_its_service_and_a_refused_one_told_why() {
    let daemon = Daemon::start(&echo_config(
        1,
        "",
        "banner = \"hello\\r\\n\"\nbanner_fail = \"go away\\r\\n\"\n\
         deny = [\"127.0.0.2\"]\nmax_connections_per_client = 1",
    ));
    let mut admitted = connect(daemon.addr());
    let mut greeting = [0u8; 7];
    admitted.set_read_timeout(Some(PATIENCE)).unwrap();
    admitted.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"hello\r\n", "the banner comes first");
    assert_eq!(exchange(&mut admitted, b"then echo", PATIENCE), Outcome::Echoed);

    // Denied by the access list, and over the per-client limit: both told, then closed.
    let mut denied = connect_from(Ipv4Addr::new(127, 0, 0, 2), daemon.addr());
    assert_eq!(read_all(&mut denied), b"go away\r\n");
    let mut second = connect(daemon.addr());
    assert_eq!(read_all(&mut second), b"go away\r\n", "refused over the limit");
    drop(admitted);
    daemon.wait_for_log("the admitted connection's access line counts the banner", |l| {
        l.contains("access listener=echo") && l.contains("in=9 out=16")
    });
}

/// A client socket that reads nothing and announces a tiny window.
fn deaf_client(source: Ipv4Addr, to: SocketAddr) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(256).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket
}

#[test]
fn refused_clients_that_never_read_do_not_hold_up_the_next_client() {
    let dir = tempfile::tempdir().unwrap();
    let refusal = dir.path().join("refused.txt");
    // The longest banner, more than a deaf client's window takes.
    std::fs::write(&refusal, vec![b'x'; 4096]).unwrap();
    let daemon = Daemon::start(&echo_config(
        1,
        "",
        &format!("banner_fail = {{ file = {:?} }}\ndeny = [\"127.0.0.2\"]", refusal),
    ));
    // One worker: were it to wait on any of these, the client after them would never be
    // served.
    let deaf: Vec<Socket> =
        (0..200).map(|_| deaf_client(Ipv4Addr::new(127, 0, 0, 2), daemon.addr())).collect();
    let mut next = connect_from(Ipv4Addr::new(127, 0, 0, 3), daemon.addr());
    assert_eq!(exchange(&mut next, b"served at once", PATIENCE), Outcome::Echoed);
    daemon.wait_for_log("the refusals, summarized", |l| l.contains("127.0.0.2 on echo (denied)"));
    drop(deaf);
    // A refused client that reads gets the whole file.
    let mut reader = connect_from(Ipv4Addr::new(127, 0, 0, 2), daemon.addr());
    assert_eq!(read_all(&mut reader), vec![b'x'; 4096]);
}

#[test]
fn check_reads_banner_files_and_refuses_what_cannot_be_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let big = "y".repeat(4097);
    std::fs::write(
        &path,
        format!(
            "[daemon]\nallow_root_workers = true\n\
             [[listener]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n\
             banner = \"{big}\"\nbanner_fail = {{ file = \"/nonexistent-preforkd/banner\" }}\n\
             [[listener]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n\
             transport = \"udp\"\nbanner = {{ file = \"relative\" }}\n"
        ),
    )
    .unwrap();
    let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 78, "{stderr}");
    for expected in [
        ":7:10: listener[0].banner: 4097 bytes, more than 4096",
        ":8:15: listener[0].banner_fail: /nonexistent-preforkd/banner: No such file",
        ":14:10: listener[1].banner: file \"relative\" must be an absolute path",
        ":14:10: listener[1].banner: applies to TCP only",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing from:\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 4, "{stderr}");
}

#[test]
fn an_allow_rule_gives_its_variables_to_the_programs_of_its_clients_only() {
    let config = "[daemon]\nworkers = 1\nallow_root_workers = true\n[log]\nlevel = \"debug\"\n\
        [[listener]]\nname = \"env\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
        allow = [{ prefix = \"127.0.0.2/32\", env = { RELAYCLIENT = \"\" } }, \"127.0.0.0/8\", \
                 { prefix = \"127.0.0.4/32\", env = { LATE = \"never\" } }]\n\
        [listener.options]\nuser = \"nobody\"\nprogram = \"/bin/sh\"\n\
        args = [\"-c\", \"echo relay=${RELAYCLIENT-unset} late=${LATE-unset}\"]\n";
    let daemon = Daemon::start(config);
    let answer = |last: u8| {
        let mut stream = connect_from(Ipv4Addr::new(127, 0, 0, last), daemon.addr());
        stream.write_all(b"").unwrap();
        String::from_utf8(read_all(&mut stream)).unwrap()
    };
    assert_eq!(answer(2), "relay= late=unset\n", "the matching rule's variable, empty");
    assert_eq!(answer(3), "relay=unset late=unset\n", "no variable for another client");
    assert_eq!(answer(4), "relay=unset late=unset\n", "the first matching rule wins: the /8");
}
