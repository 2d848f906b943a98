//! TLS to the backends (`backend_tls`): the relay is a TLS client of each backend, as
//! stunnel's client mode, nginx's `proxy_ssl` and HAProxy's `server ... ssl` are.
//!
//! Runs in workers; the rustls client configuration ([`ClientTls`]) was made in the master
//! with the rest of the configuration, and each worker keeps its own session cache in it (a
//! worker resumes the sessions it made). A [`TlsLink`] owns one backend connection's
//! `rustls::ClientConnection`, driven from the worker's readiness loop as the relay's
//! session calls it; it never blocks. Invariants:
//! - the handshake is part of the connect: `connect_timeout` covers both, and a handshake that
//!   fails (a certificate that does not chain to the trusted roots or is not valid for the
//!   expected name, a backend that refuses us, a reset) is a failed connect: counted in the
//!   backend's passive health, logged in summary ([`BackendTls::log_failure`]: the first at
//!   once, the others counted and reported at the end of each interval), followed by
//!   the next backend while the client's bytes wait unread. With TLS 1.3 the backend reads
//!   our certificate (or sees we sent none) only after our side of the handshake is
//!   complete, and refuses with an alert: the session waits for the backend's first record
//!   ([`TlsLink::accepted`]) before it reads the client, unless the client speaks first, so
//!   such a refusal is a failed connect too; one that comes after the client spoke is still
//!   counted as a failed connect, and the client is reset;
//! - buffers are rustls's: at most [`SEND_BUFFER`] of records are queued for the backend
//!   before the up pump is told `WouldBlock`, and rustls reads no record while plaintext
//!   waits for the down pump ([`TlsLink::interest`]), so backpressure holds both ways;
//!   plaintext is copied into rustls on the way up and out of it on the way down, and
//!   nowhere else (no splice: the bytes must pass through rustls);
//! - the client's FIN becomes `close_notify`, then FIN once every record is written; the
//!   backend's `close_notify`, or its TCP end without one, is an end-of-file for the down
//!   pump (a relay cannot tell a truncation from an end: as nginx does, it passes it on);
//! - it is never handed off (its keys live in this process): a reload drains it.

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use crate::net::{Address, Stream};
use crate::pki::client::ClientTls;
use crate::rate::RateLimit;
use crate::services::Interest;

/// Most TLS output queued per backend connection before the up pump waits, in bytes
/// (rustls's default, written down since backpressure relies on it).
pub const SEND_BUFFER: usize = 64 * 1024;

/// Reads of records from the backend per callback at most, for fairness.
const READS_PER_CALL: usize = 8;

/// Least interval between two log lines about failed TLS with a relay's backends.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A relay's TLS to its backends.
pub struct BackendTls {
    /// The rustls configuration (trusted roots, client certificate, session cache).
    client: ClientTls,
    /// `server_name`: sent (SNI) and verified for every backend; `None`: each backend's own
    /// host as written.
    server_name: Option<ServerName<'static>>,
    /// Failures logged at most once per [`LOG_INTERVAL`] (per worker: each has its copy).
    log: Mutex<FailureLog>,
}

/// The summary of failed TLS with a relay's backends, in one worker.
#[derive(Debug)]
struct FailureLog {
    limit: RateLimit,
    /// The last failure held back: `backend ADDRESS: WHY`.
    last: String,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        self.client == other.client && self.server_name == other.server_name
    }
}

impl Eq for BackendTls {}

impl BackendTls {
    /// TLS with `client`'s configuration, verifying `server_name` (`None`: each backend's
    /// host).
    pub fn new(client: ClientTls, server_name: Option<ServerName<'static>>) -> Self {
        let log = FailureLog { limit: RateLimit::new(LOG_INTERVAL), last: String::new() };
        BackendTls { client, server_name, log: Mutex::new(log) }
    }

    /// The name to send and verify for a backend whose own is `host` (from its address as
    /// written): `server_name` when given.
    pub fn name_for<'a>(&'a self, host: Option<&'a ServerName<'static>>) -> Option<&'a ServerName<'static>> {
        self.server_name.as_ref().or(host)
    }

    /// Starts TLS with a backend just connected, verifying `name`; `ahead` (the PROXY
    /// header) is written in plain text before the first record.
    ///
    /// # Errors
    /// rustls could not start a client connection (it cannot, with a valid configuration).
    pub fn link(&self, name: &ServerName<'static>, ahead: Vec<u8>) -> Result<TlsLink, rustls::Error> {
        TlsLink::new(self.client.config(), name.clone(), ahead)
    }

    /// Logs that TLS with backend `address` failed (`why`), in summary: the first failure at
    /// once, then at most one line per [`LOG_INTERVAL`]; the failures held back meanwhile are
    /// counted and reported by [`BackendTls::flush_log`] at the end of the interval, whether
    /// another failure comes or not.
    pub fn log_failure(&self, address: &Address, why: &dyn Display, now: Instant) {
        let Ok(mut log) = self.log.lock() else { return };
        match log.limit.allow(now) {
            Some(held_back) => {
                let more = match held_back {
                    0 => String::new(),
                    n => format!(" ({n} more failures with this relay's backends since the last line)"),
                };
                log::warn!(
                    "relay: TLS with backend {address} failed: {why}{more}; further failures are counted and logged every {}s",
                    LOG_INTERVAL.as_secs()
                );
            }
            None => log.last = format!("backend {address}: {why}"),
        }
    }

    /// When failures held back are due to be reported (`None`: none is).
    pub fn log_deadline(&self) -> Option<Instant> {
        self.log.lock().ok()?.limit.report_due()
    }

    /// Reports the failures held back, if due at `now` (any time with `all`: the worker
    /// stops), in one line with the last of them.
    pub fn flush_log(&self, now: Instant, all: bool) {
        let Ok(mut log) = self.log.lock() else { return };
        if let Some(held_back) = log.limit.report(now, all) {
            log::warn!(
                "relay: TLS with this relay's backends failed {held_back} more time(s) in the last {}s (the last: {})",
                LOG_INTERVAL.as_secs(),
                log.last
            );
        }
    }
}

/// A failure of a backend's TLS.
#[derive(Debug)]
pub enum Fault {
    /// The socket failed (a reset).
    Io(io::Error),
    /// rustls refused what the backend sent, or the backend sent an alert.
    Tls(rustls::Error),
    /// The backend closed the connection before the handshake completed.
    Closed,
}

impl Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Io(error) => write!(f, "{error}"),
            Fault::Tls(error) => write!(f, "{error}"),
            Fault::Closed => f.write_str("the backend closed the connection during the handshake"),
        }
    }
}

impl From<Fault> for io::Error {
    fn from(fault: Fault) -> io::Error {
        match fault {
            Fault::Io(error) => error,
            Fault::Tls(error) => io::Error::new(io::ErrorKind::InvalidData, error),
            Fault::Closed => io::ErrorKind::UnexpectedEof.into(),
        }
    }
}

/// One backend connection's TLS.
pub struct TlsLink {
    conn: ClientConnection,
    /// Plain bytes to write before the first record (the PROXY header), not yet written.
    ahead: Vec<u8>,
    /// The backend's TCP end-of-file was read.
    eof: bool,
    /// The records read from the backend so far.
    records: Records,
    /// Whether the backend accepted us: see [`TlsLink::accepted`].
    verdict: Verdict,
}

/// Whether the backend accepted the relay as its client. In TLS 1.2 its Finished says so,
/// within the handshake. In TLS 1.3 our side of the handshake completes before the backend
/// has read our certificate (or our lack of one): it refuses with an alert after, so only a
/// record it sends after our Finished (a session ticket, which servers send at once, or
/// data) tells that it accepted us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The handshake is not complete.
    Handshaking,
    /// TLS 1.3, complete on our side when `records` records had been read: accepted once
    /// one more is read and processed without error.
    Awaited {
        /// Records read when the handshake completed.
        records: u64,
    },
    /// Accepted: TLS 1.2, a resumed session (the backend accepted us when it made it), or
    /// a record came after our Finished.
    Given,
}

/// Counts whole TLS records in the bytes read from the backend, by the record layer's
/// framing (RFC 8446 section 5.1: a 5-byte header whose last two bytes are the length of the
/// fragment that follows), so that "a record came" does not mistake the first bytes of one
/// for all of it.
#[derive(Debug, Default)]
struct Records {
    /// The current record's header bytes read, up to 5.
    header: [u8; 5],
    have: usize,
    /// Bytes of the current record's fragment still to come.
    left: usize,
    /// Whole records read.
    whole: u64,
}

impl Records {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                if self.left == 0 {
                    self.whole += 1;
                }
                continue;
            }
            let n = (self.header.len() - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.header.len() {
                self.have = 0;
                self.left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                if self.left == 0 {
                    self.whole += 1;
                }
            }
        }
    }
}

/// The backend socket as rustls reads it, with every byte read counted into [`Records`].
struct Tap<'a> {
    stream: &'a Stream,
    records: &'a mut Records,
}

impl Read for Tap<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&*self.stream).read(buf)?;
        self.records.feed(&buf[..n]);
        Ok(n)
    }
}

impl TlsLink {
    fn new(
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
        ahead: Vec<u8>,
    ) -> Result<TlsLink, rustls::Error> {
        let mut conn = ClientConnection::new(Arc::clone(config), name)?;
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Ok(TlsLink {
            conn,
            ahead,
            eof: false,
            records: Records::default(),
            verdict: Verdict::Handshaking,
        })
    }

    /// Reads what the backend sent into rustls, counting its records.
    fn read_tls(&mut self, stream: &Stream) -> io::Result<usize> {
        self.conn.read_tls(&mut Tap { stream, records: &mut self.records })
    }

    /// Whether the backend accepted us as its client: with TLS 1.3, only once it sent a
    /// record after the handshake (see [`Verdict`]); `false` before the handshake completes.
    pub fn accepted(&mut self) -> bool {
        if let Verdict::Awaited { records } = self.verdict
            && self.records.whole > records
        {
            self.verdict = Verdict::Given;
        }
        self.verdict == Verdict::Given
    }

    /// The handshake just completed on our side: what is known of the backend's verdict.
    fn completed(&mut self) {
        if self.verdict != Verdict::Handshaking {
            return;
        }
        let tls13 = self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        let resumed = self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        self.verdict = match tls13 && !resumed {
            true => Verdict::Awaited { records: self.records.whole },
            false => Verdict::Given,
        };
    }

    /// Whether the backend ended the connection (TCP end-of-file, or `close_notify`).
    pub fn ended(&mut self) -> bool {
        self.eof || self.conn.process_new_packets().is_ok_and(|state| state.peer_has_closed())
    }

    /// Moves the handshake on over `stream` as far as it goes without blocking; `true` once
    /// it is complete (our last records may still wait to be written: see
    /// [`TlsLink::flush`]).
    ///
    /// # Errors
    /// The handshake failed: [`Fault`] says how.
    pub fn handshake(&mut self, stream: &Stream) -> Result<bool, Fault> {
        loop {
            self.flush(stream).map_err(Fault::Io)?;
            if !self.conn.is_handshaking() {
                self.completed();
                return Ok(true);
            }
            if self.eof || !self.conn.wants_read() {
                return Ok(false);
            }
            match self.read_tls(stream) {
                Ok(0) => return Err(Fault::Closed),
                Ok(_) => {
                    self.conn.process_new_packets().map_err(Fault::Tls)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fault::Io(e)),
            }
        }
    }

    /// Reads and processes records from `stream` while rustls wants them (it stops while
    /// plaintext waits to be read), at most [`READS_PER_CALL`].
    ///
    /// # Errors
    /// The socket failed, or rustls refused a record (the alert it queued goes out with the
    /// next [`TlsLink::flush`]).
    pub fn read_records(&mut self, stream: &Stream) -> Result<(), Fault> {
        for _ in 0..READS_PER_CALL {
            if self.eof || !self.conn.wants_read() {
                break;
            }
            match self.read_tls(stream) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Io(e)),
            }
            self.conn.process_new_packets().map_err(Fault::Tls)?;
        }
        Ok(())
    }

    /// Writes what waits (the plain bytes ahead, then records) to `stream` until nothing
    /// does or the socket is full.
    ///
    /// # Errors
    /// The socket failed.
    pub fn flush(&mut self, stream: &Stream) -> io::Result<()> {
        while !self.ahead.is_empty() {
            match (&*stream).write(&self.ahead) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(self.ahead.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut &*stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether bytes or records wait to be written.
    pub fn wants_write(&self) -> bool {
        !self.ahead.is_empty() || self.conn.wants_write()
    }

    /// Whether plaintext (or the backend's end) waits in rustls for the down pump: the
    /// backend socket's readiness no longer tells, so the session must be called back.
    pub fn has_input(&mut self) -> bool {
        self.eof
            || self.conn.process_new_packets().is_ok_and(|state| {
                state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
            })
    }

    /// What to watch the backend socket for: records to write, and records to read while
    /// rustls wants them and the down pump has room (`down_room`).
    pub fn interest(&self, down_room: bool) -> Interest {
        Interest {
            read: down_room && !self.eof && self.conn.wants_read(),
            write: self.wants_write(),
            exclusive: false,
        }
    }

    /// Queues `close_notify` (the client sent FIN): nothing more goes up.
    pub fn close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// The plaintext side, as the pumps' source (backend to client) and sink (client to
    /// backend).
    pub fn plain(&mut self) -> Plain<'_> {
        Plain(&mut self.conn)
    }

    /// The protocol version the handshake settled (`1.3`, `1.2`) and whether it resumed a
    /// session, for the access line; `None` before the handshake.
    pub fn facts(&self) -> Option<(&'static str, bool)> {
        let version = match self.conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "1.3",
            rustls::ProtocolVersion::TLSv1_2 => "1.2",
            _ => "unknown",
        };
        Some((version, self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)))
    }
}

/// rustls's plaintext side as a byte stream.
pub struct Plain<'a>(&'a mut ClientConnection);

impl Read for Plain<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.reader().read(buf) {
            // The backend's TCP end without close_notify: an end all the same.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl Write for Plain<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.writer().write(buf)? {
            // rustls's buffer is full (SEND_BUFFER): the pump waits for the socket.
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_counted_whole_however_the_bytes_are_cut() {
        let record = |len: u16| {
            let mut bytes = vec![0x17, 3, 3];
            bytes.extend(len.to_be_bytes());
            bytes.extend(vec![0xab; usize::from(len)]);
            bytes
        };
        let bytes: Vec<u8> = [record(3), record(0), record(300)].concat();
        for cut in 1..=bytes.len() {
            let mut records = Records::default();
            for chunk in bytes.chunks(cut) {
                records.feed(chunk);
            }
            assert_eq!(records.whole, 3, "in chunks of {cut}");
        }
        let mut partial = Records::default();
        partial.feed(&bytes[..bytes.len() - 1]);
        assert_eq!(partial.whole, 2, "the last one is not whole yet");
        partial.feed(&bytes[..4]);
        assert_eq!(partial.whole, 3, "its last byte, then a header begun");
    }
}
