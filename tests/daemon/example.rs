//! `examples/upper.rs`: a service of its own, run by the whole daemon through the library
//! API, with its options, `check`, a reload and a per-client limit.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};

use crate::harness::*;

fn upper_config(greeting: &str, options: &str) -> String {
    format!(
        "[daemon]\nworkers = 2\nallow_root_workers = true\npid_file = \"@DIR@/upper.pid\"\n\
         [log]\nlevel = \"debug\"\n\
         [[listener]]\nname = \"upper\"\naddress = \"127.0.0.1:0\"\nservice = \"upper\"\n\
         max_connections_per_client = 2\n\
         [listener.options]\ngreeting = \"{greeting}\"\n{options}"
    )
}

fn line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a line");
    line
}

fn open(source: Ipv4Addr, daemon: &Daemon) -> (TcpStream, BufReader<TcpStream>) {
    let stream = connect_from(source, daemon.addr());
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

#[test]
fn the_upper_example_runs_under_the_whole_daemon() {
    let program = example("upper");
    let mut daemon =
        Daemon::spawn_program(&program, &[], &upper_config("HI", "max_line = 64\n"), None, &[]);
    daemon.wait_ready();

    // Its protocol: greeting, capitals, QUIT.
    let (mut stream, mut reader) = open(Ipv4Addr::LOCALHOST, &daemon);
    assert_eq!(line(&mut reader), "HI\r\n");
    stream.write_all(b"hello, world\n").unwrap();
    assert_eq!(line(&mut reader), "HELLO, WORLD\r\n");
    stream.write_all(b"QUIT\n").unwrap();
    assert_eq!(line(&mut reader), "BYE\r\n");
    assert_eq!(line(&mut reader), "", "closed after BYE");

    // The daemon's per-client limit applies to it: 2 from 127.0.0.2, the third is refused.
    let client = Ipv4Addr::new(127, 0, 0, 2);
    let mut held: Vec<_> = (0..2).map(|_| open(client, &daemon)).collect();
    for (_, reader) in &mut held {
        assert_eq!(line(reader), "HI\r\n");
    }
    let (_refused, mut reader) = open(client, &daemon);
    assert_eq!(line(&mut reader), "", "over max_connections_per_client");
    drop(held);

    // `check` runs the service's own option checks: every problem, with its place.
    daemon.rewrite_config(&upper_config("HI", "max_line = 0\ncolour = \"red\"\n"));
    let (status, _, stderr) = daemon.control("check");
    assert_eq!(code(status), 78, "{stderr}");
    assert!(stderr.contains(":15:1: listener[0].options.colour: unknown field"), "{stderr}");
    assert!(stderr.contains(":14:12: listener[0].options.max_line: 0 is out of range"), "{stderr}");
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 78, "an invalid reload is refused: {stderr}");

    // A reload applies changed options to new connections.
    daemon.rewrite_config(&upper_config("HELLO AGAIN", "max_line = 64\n"));
    let (status, stdout, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    let (mut stream, mut reader) = open(Ipv4Addr::LOCALHOST, &daemon);
    assert_eq!(line(&mut reader), "HELLO AGAIN\r\n");
    stream.write_all(b"x\n").unwrap();
    assert_eq!(line(&mut reader), "X\r\n");

    // The plain preforkd binary does not know the service: check says which ones it knows.
    let (status, _, stderr) = run_cli(&["check", "-c", daemon.config_path.to_str().unwrap()]);
    assert_eq!(code(status), 78);
    assert!(
        stderr.contains(
            "unknown service \"upper\": expected one of echo, discard, chargen, daytime, time"
        ),
        "{stderr}"
    );

    // A graceful stop: the drain notice reaches the session, which says goodbye and ends.
    daemon.signal(nix::sys::signal::Signal::SIGQUIT);
    assert_eq!(line(&mut reader), "BYE server going away\r\n");
    assert_eq!(line(&mut reader), "", "closed after the goodbye");
    assert_eq!(daemon.wait_exit(PATIENCE).map(code), Some(0));
}
