//! `kv`: a small key-value store speaking the Redis protocol (RESP2), run by the whole
//! preforkd daemon. Commands: `PING [message]`, `ECHO message`, `GET key`, `SET key value`,
//! `DEL key [key ...]`, `INCR key`, `DBSIZE`, `QUIT`, and `CONFIG GET save|appendonly`
//! (which redis-benchmark asks); as multibulk requests (what redis-cli and client
//! libraries send) or inline commands (`PING` typed into nc: words split at spaces, no
//! quotes).
//!
//! Its keys live in a [`SharedMap`], shared memory every worker reads and writes under one
//! robust lock: a `SET` on one connection is seen by a `GET` on any other, whichever worker
//! serves it. The map is made the first time the service is built, in the process that
//! becomes the master (before any worker is forked), and kept across reloads; it is not
//! persistent: a restart or a binary upgrade (a new master) starts empty. Options, in
//! `[listener.options]` (a reload cannot change them: the map's size is fixed):
//! `capacity` (keys, default 16384), `max_key` (bytes, default 128), `max_value` (bytes,
//! default 1024).
//!
//! Each connection is a [`Framed`] session: the [`resp`] decoder measures a request, the
//! handler answers it; buffering, backpressure, the request size limit and the hand-off of
//! a connection across a reload are the helper's.
//!
//! ```sh
//! cargo run --release --example kv -- -c examples/kv.toml
//! redis-cli -p 7791 SET greeting hello; redis-cli -p 7791 GET greeting
//! ```

use std::cell::OnceCell;
use std::io::Write;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::rc::Rc;

use preforkd::services::framing::lines;
use preforkd::services::{ConnInfo, Frame, FrameAction, FrameHandler, Framed, HookError};
use preforkd::services::{Invalid, Options, Service, Session, WorkerInfo};
use preforkd::shared::{SharedError, SharedMap, Update};

/// Arguments of one request at most.
const MAX_ARGS: i64 = 1024;

/// `[listener.options]` as written; unknown keys are errors in `preforkd check`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KvOptions {
    capacity: Option<usize>,
    max_key: Option<usize>,
    max_value: Option<usize>,
}

/// The service: the shared map, and the longest request it takes.
struct Kv {
    store: Rc<SharedMap>,
    max_request: usize,
}

impl Kv {
    /// Builds the service; `store` holds the map made by the first build of this process,
    /// which later builds (reloads) share.
    fn from_options(
        options: &mut Options<'_>,
        store: &OnceCell<Rc<SharedMap>>,
    ) -> Result<Kv, Invalid> {
        let KvOptions { capacity, max_key, max_value } = options.parse()?;
        let (capacity, max_key, max_value) =
            (capacity.unwrap_or(16_384), max_key.unwrap_or(128), max_value.unwrap_or(1024));
        for (key, value, most) in [
            ("capacity", capacity, 1 << 24),
            ("max_key", max_key, 1 << 16),
            ("max_value", max_value, 1 << 24),
        ] {
            if !(1..=most).contains(&value) {
                options.report(key, format!("{value} is out of range: 1 to {most}"));
            }
        }
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        let map = match store.get() {
            Some(map) => Rc::clone(map),
            None => match SharedMap::new(capacity, max_key, max_value) {
                Ok(map) => Rc::clone(store.get_or_init(|| Rc::new(map))),
                Err(error) => {
                    options.report("capacity", format!("cannot make the store: {error}"));
                    return Err(Invalid);
                }
            },
        };
        if (map.capacity(), map.max_key(), map.max_value()) != (capacity.get(), max_key, max_value)
        {
            options.report(
                "capacity",
                "the store's size (capacity, max_key, max_value) is fixed at start: a restart changes it",
            );
        }
        // The longest SET there is and room for its framing, or a DEL of many keys.
        let max_request = (max_key + max_value + 64).max(64 * 1024);
        options.finish(Kv { store: map, max_request })
    }
}

impl Service for Kv {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(Framed::new(Handler { store: Rc::clone(&self.store) }, resp, self.max_request))
    }

    /// A connection handed over by a reload: `Framed` brings its buffers, the handler has no
    /// state of its own.
    fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let handler =
            |own: &[u8]| own.is_empty().then(|| Handler { store: Rc::clone(&self.store) });
        Some(Box::new(Framed::import(state, resp, self.max_request, handler)?))
    }

    /// Runs in each worker: the map was inherited through fork, so it is there already.
    fn after_fork(&self, worker: &WorkerInfo<'_>) -> Result<(), HookError> {
        log::debug!(
            "kv: worker {} shares a store of {} keys at most ({} now)",
            worker.slot,
            self.store.capacity(),
            self.store.len()
        );
        Ok(())
    }
}

/// Finds one request: a multibulk array (`*N`, then N bulk strings `$LEN`) or an inline
/// command line. See RESP2, <https://redis.io/docs/reference/protocol-spec/>.
fn resp(input: &[u8]) -> Frame {
    match input.first() {
        None => Frame::Incomplete,
        Some(b'*') => multibulk(input),
        Some(_) => lines(input),
    }
}

fn multibulk(input: &[u8]) -> Frame {
    let (count, mut at) = match number(input, 1) {
        Ok(Some(found)) => found,
        Ok(None) => return Frame::Incomplete,
        Err(reason) => return Frame::Invalid(reason),
    };
    if !(1..=MAX_ARGS).contains(&count) {
        return Frame::Invalid("bad-multibulk-length");
    }
    for _ in 0..count {
        match input.get(at) {
            None => return Frame::Incomplete,
            Some(b'$') => {}
            Some(_) => return Frame::Invalid("bad-bulk"),
        }
        let (len, data) = match number(input, at + 1) {
            Ok(Some(found)) => found,
            Ok(None) => return Frame::Incomplete,
            Err(reason) => return Frame::Invalid(reason),
        };
        let Some(end) = usize::try_from(len).ok().and_then(|len| (data + 2).checked_add(len))
        else {
            return Frame::Invalid("bad-bulk-length");
        };
        if input.len() < end {
            // At least this much: the helper refuses a request announced over its limit
            // before it arrives.
            return Frame::Needs(end);
        }
        if &input[end - 2..end] != b"\r\n" {
            return Frame::Invalid("bad-bulk");
        }
        at = end;
    }
    Frame::whole(at)
}

/// The decimal number at `input[at..]` up to its CR LF, and where what follows starts;
/// `None` while the CR LF has not arrived.
fn number(input: &[u8], at: usize) -> Result<Option<(i64, usize)>, &'static str> {
    let rest = input.get(at..).unwrap_or_default();
    let Some(cr) = rest.iter().take(21).position(|&b| b == b'\r') else {
        return if rest.len() > 20 { Err("bad-length") } else { Ok(None) };
    };
    match rest.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err("bad-length"),
    }
    let value = std::str::from_utf8(&rest[..cr]).ok().and_then(|s| s.parse().ok());
    value.map(|value| Some((value, at + cr + 2))).ok_or("bad-length")
}

/// The arguments of a request `resp` found (a checked multibulk array, or an inline line).
fn arguments(request: &[u8]) -> Vec<&[u8]> {
    if request.first() != Some(&b'*') {
        return request.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).collect();
    }
    let mut args = Vec::new();
    let Ok(Some((count, mut at))) = number(request, 1) else { return args };
    for _ in 0..count {
        let Ok(Some((len, data))) = number(request, at + 1) else { break };
        let end = data + len as usize;
        args.push(&request[data..end]);
        at = end + 2;
    }
    args
}

/// One connection's handler: no state of its own, every key is in the shared map.
struct Handler {
    store: Rc<SharedMap>,
}

impl FrameHandler for Handler {
    fn on_frame(&mut self, request: &[u8], out: &mut Vec<u8>) -> FrameAction {
        let args = arguments(request);
        let Some((name, args)) = args.split_first() else {
            return FrameAction::Continue; // an empty inline line: Redis ignores it too
        };
        let is = |command: &str| name.eq_ignore_ascii_case(command.as_bytes());
        match args {
            [] if is("PING") => out.extend(b"+PONG\r\n"),
            [message] if is("PING") || is("ECHO") => bulk(out, message),
            [key] if is("GET") => match self.store.get(key, |value| bulk(out, value)) {
                Ok(Some(())) => {}
                Ok(None) => out.extend(b"$-1\r\n"),
                Err(error) => store_error(out, &error),
            },
            [key, value] if is("SET") => match self.store.insert(key, value) {
                Ok(()) => out.extend(b"+OK\r\n"),
                Err(error) => store_error(out, &error),
            },
            [_, _, ..] if is("SET") => out.extend(b"-ERR syntax error\r\n"),
            [_, ..] if is("DEL") => {
                let mut removed = 0;
                for key in args {
                    match self.store.remove(key) {
                        Ok(gone) => removed += i64::from(gone),
                        Err(error) => {
                            store_error(out, &error);
                            return FrameAction::Continue;
                        }
                    }
                }
                integer(out, removed);
            }
            [key] if is("INCR") => match self.store.update(key, increment) {
                Ok(Ok(n)) => integer(out, n),
                Ok(Err(message)) => out.extend(message),
                Err(error) => store_error(out, &error),
            },
            [] if is("DBSIZE") => integer(out, self.store.len() as i64),
            [] if is("QUIT") => {
                out.extend(b"+OK\r\n");
                return FrameAction::Close;
            }
            [sub, parameter] if is("CONFIG") && sub.eq_ignore_ascii_case(b"GET") => {
                // No persistence: what redis-benchmark asks, answered as Redis would.
                let value: &[u8] = match parameter.to_ascii_lowercase().as_slice() {
                    b"save" => b"",
                    b"appendonly" => b"no",
                    _ => {
                        out.extend(b"*0\r\n");
                        return FrameAction::Continue;
                    }
                };
                out.extend(b"*2\r\n");
                bulk(out, parameter);
                bulk(out, value);
            }
            _ if ["PING", "ECHO", "GET", "SET", "DEL", "INCR", "DBSIZE", "QUIT", "CONFIG"]
                .iter()
                .any(|command| is(command)) =>
            {
                let _ = write!(
                    out,
                    "-ERR wrong number of arguments for '{}' command\r\n",
                    String::from_utf8_lossy(name).to_lowercase()
                );
            }
            _ => {
                let _ = write!(out, "-ERR unknown command '{}'\r\n", String::from_utf8_lossy(name));
            }
        }
        FrameAction::Continue
    }

    fn on_error(&mut self, reason: &'static str, out: &mut Vec<u8>) {
        let _ = write!(out, "-ERR Protocol error: {reason}\r\n");
    }

    /// No state between requests: the connection moves with its buffers alone.
    fn export(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}

/// `INCR`'s change: the value read as a signed 64-bit decimal, plus one; the new number, or
/// the error to send (and no change).
fn increment(old: Option<&[u8]>) -> (Update, Result<i64, &'static [u8]>) {
    const NOT_INTEGER: &[u8] = b"-ERR value is not an integer or out of range\r\n";
    let old = match old.map(|v| std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok())) {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return (Update::Keep, Err(NOT_INTEGER)),
    };
    match old.checked_add(1) {
        Some(new) => (Update::Set(new.to_string().into_bytes()), Ok(new)),
        None => (Update::Keep, Err(NOT_INTEGER)),
    }
}

fn bulk(out: &mut Vec<u8>, value: &[u8]) {
    let _ = write!(out, "${}\r\n", value.len());
    out.extend(value);
    out.extend(b"\r\n");
}

fn integer(out: &mut Vec<u8>, n: i64) {
    let _ = write!(out, ":{n}\r\n");
}

fn store_error(out: &mut Vec<u8>, error: &SharedError) {
    let _ = write!(out, "-ERR {error}\r\n");
}

fn main() -> ExitCode {
    let store = OnceCell::new();
    preforkd::Daemon::new().service("kv", move |options| Kv::from_options(options, &store)).main()
}
