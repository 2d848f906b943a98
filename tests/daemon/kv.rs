//! `examples/kv.rs`: a Redis-protocol key-value store on the library API (`Framed`, a
//! `SharedMap`, the worker hooks), driven by the real `redis-cli`: every worker sees every
//! key, the store outlives a reload, and a connection open across the reload keeps its
//! conversation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;

use crate::harness::*;

fn kv_config(options: &str) -> String {
    format!(
        "[daemon]\nworkers = 2\nallow_root_workers = true\npid_file = \"@DIR@/kv.pid\"\n\
         [log]\nlevel = \"debug\"\n\
         [[listener]]\nname = \"kv\"\naddress = \"127.0.0.1:0\"\nservice = \"kv\"\n\
         max_connections_per_client = 0\nmax_long_connections_per_client = 0\n\
         [listener.options]\ncapacity = 64\nmax_key = 32\nmax_value = 64\n{options}"
    )
}

/// Runs `redis-cli -h 127.0.0.1 -p PORT ARGS...` (a new connection each time) and returns
/// its output, without the last newline.
fn redis_cli(daemon: &Daemon, args: &[&str]) -> String {
    let port = daemon.addr().port().to_string();
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port])
        .args(args)
        .output()
        .expect("redis-cli (redis-tools) is installed");
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

/// One RESP request on an open connection, and its one-line answer.
fn request(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, words: &[&str]) -> String {
    let mut bytes = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        bytes.extend(format!("${}\r\n{word}\r\n", word.len()).into_bytes());
    }
    stream.write_all(&bytes).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn the_kv_example_answers_redis_cli_from_every_worker_and_keeps_its_keys_across_a_reload() {
    let program = example("kv");
    let mut daemon = Daemon::spawn_program(&program, &[], &kv_config(""), None, &[]);
    daemon.wait_ready();

    assert_eq!(redis_cli(&daemon, &["PING"]), "PONG");
    assert_eq!(redis_cli(&daemon, &["ECHO", "hello world"]), "hello world");
    assert_eq!(redis_cli(&daemon, &["SET", "greeting", "hi there"]), "OK");
    // Each redis-cli is a new connection, served by either worker: all see the key (the
    // issue's per-worker map missed it 5 times out of 6).
    for _ in 0..8 {
        assert_eq!(redis_cli(&daemon, &["GET", "greeting"]), "hi there");
    }
    for n in 1..=10 {
        assert_eq!(redis_cli(&daemon, &["INCR", "counter"]), n.to_string());
    }
    assert_eq!(redis_cli(&daemon, &["GET", "missing"]), "");
    assert!(redis_cli(&daemon, &["INCR", "greeting"]).contains("not an integer"));
    assert_eq!(redis_cli(&daemon, &["DEL", "counter", "missing"]), "1");
    assert_eq!(redis_cli(&daemon, &["DBSIZE"]), "1");
    assert!(redis_cli(&daemon, &["FLUSHALL"]).contains("unknown command 'FLUSHALL'"));
    let long = "x".repeat(65);
    assert!(redis_cli(&daemon, &["SET", "long", &long]).contains("over the map's 64"));
    let workers = daemon.status().unwrap().ready(1);
    assert_eq!(workers.len(), 2);

    // Inline commands, as typed into nc; QUIT ends the conversation.
    let mut stream = connect(daemon.addr());
    stream.write_all(b"PING\r\nSET inline yes\r\nGET inline\r\nQUIT\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "+PONG\r\n+OK\r\n$3\r\nyes\r\n+OK\r\n");

    // A protocol error gets Redis's words, then the close.
    let mut stream = connect(daemon.addr());
    stream.write_all(b"*1\r\n#4\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "-ERR Protocol error: bad-bulk\r\n");

    // A reload: the store is the master's, so the new generation has every key; a client
    // connected across it goes on where it was (its connection is handed off).
    let mut open = connect(daemon.addr());
    let mut reader = BufReader::new(open.try_clone().unwrap());
    assert_eq!(request(&mut open, &mut reader, &["SET", "across", "reload"]), "+OK\r\n");
    // Another client is in the middle of a request: it moves with the half it sent.
    let mut halfway = connect(daemon.addr());
    halfway.write_all(b"*2\r\n$4\r\nECHO\r\n$12\r\nhalf").unwrap();
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    daemon.wait_generation(2);
    daemon
        .wait_until("the old generation is gone", |s| s.workers.iter().all(|w| w.generation == 2));
    assert_eq!(request(&mut open, &mut reader, &["GET", "across"]), "$6\r\n");
    let mut rest = String::new();
    reader.read_line(&mut rest).unwrap();
    assert_eq!(rest, "reload\r\n");
    halfway.write_all(b" a frame\r\n").unwrap();
    let mut answer = [0u8; 19];
    halfway.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"$12\r\nhalf a frame\r\n", "its first half came along");
    assert_eq!(redis_cli(&daemon, &["GET", "greeting"]), "hi there");
    assert_eq!(redis_cli(&daemon, &["DBSIZE"]), "3");

    // The store's size is fixed at start: the running master refuses a reload that changes
    // it (`check`, a process of its own, has no store yet to compare with).
    daemon.rewrite_config(&kv_config("").replace("capacity = 64", "capacity = 128"));
    let (status, _, stderr) = daemon.control("check");
    assert_eq!(code(status), 0, "{stderr}");
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 70, "the daemon rejected it: {stderr}");
    assert!(stderr.contains("options.capacity: the store's size"), "{stderr}");
    assert_eq!(redis_cli(&daemon, &["GET", "across"]), "reload", "and serves on");
}
