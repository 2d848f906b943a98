//! [`TlsSession`]: the TLS layer of one connection, a [`Session`] that owns the
//! `rustls::ServerConnection` and the service's session above it.
//!
//! Runs in workers; the loop drives it as any session (readiness of the client socket, its
//! timer, extra descriptors), and it drives rustls as its `tlsserver-mio` example does: read
//! records while rustls wants them, process them, hand plaintext up, write records while
//! rustls has some. Invariants:
//! - the service's session is made once the handshake completes (with the TLS facts in its
//!   `ConnInfo`), and until then sees nothing; it reads and writes plaintext through a
//!   [`Context`] whose `io()` is rustls's reader and writer, so it is the same code as on a
//!   plain listener;
//! - buffers are rustls's: at most one record of input is read ahead (`wants_read` is false
//!   while plaintext waits to be read) and at most [`SEND_BUFFER`] of output is queued before
//!   the session is told `WouldBlock`; plaintext is copied into rustls on the way out and out
//!   of it on the way in, and nowhere else;
//! - an end the session asks for goes out after `close_notify` (RFC 8446 section 6.1): a
//!   close or a half-close is carried out once every record is written; a reset is at once;
//! - a handshake that fails is counted by reason and ends the connection with
//!   [`CloseReason::Handshake`], after the alert rustls queued;
//! - for a service that passes its socket to a child
//!   ([`crate::services::Service::passes_socket`], exec), the session gets one end of a
//!   socket pair, and this layer moves plaintext between the other end (an extra descriptor
//!   it watches) and rustls;
//! - it is never handed off (its keys live in this process): a reload drains it.

use std::fmt::Write as _;
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;

use crate::net::Peer;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use rustls::{CipherSuite, HandshakeKind, ProtocolVersion, ServerConnection};
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use super::acceptor::{Acceptor, SEND_BUFFER};
use crate::scoreboard::TlsFailure;
use crate::services::{
    ClientCertificate, CloseReason, ConnInfo, Context, Ending, Interest, Movable, Progress, Ready,
    Requests, Session, TlsInfo, Transport,
};

/// Reads of TLS records from the socket per callback at most, for fairness.
const READS_PER_CALL: usize = 8;

/// Calls of the service's session per callback at most, for fairness.
const CALLS_PER_CALL: usize = 4;

/// Bytes moved from the child's socket pair into rustls per read.
const PIPE_CHUNK: usize = 16 * 1024;

/// The TLS layer of one connection.
pub struct TlsSession {
    acceptor: Rc<Acceptor>,
    conn: ServerConnection,
    peer: Peer,
    bound: Option<SocketAddr>,
    stage: Stage,
    /// The client's TCP end-of-file was read.
    eof: bool,
    /// Plaintext waits in rustls for a session that wants it (it is then called back at
    /// once: the socket's readiness no longer tells).
    pending: bool,
    /// What to do once every record is written (`close_notify` is queued).
    after: Option<After>,
    /// The session asked to close: nothing more is read or handed up (the session is kept
    /// for the access line).
    closing: bool,
    /// What the handshake settled, for the access line.
    info: Option<TlsInfo>,
}

enum Stage {
    /// Before the first callback: the handshake's deadline is not set yet.
    Fresh,
    /// The handshake is under way.
    Handshake,
    /// The service's session is served.
    Serving { session: Box<dyn Session>, pipe: Option<Pipe> },
    /// The connection is ending (a failed handshake, a close under way): nothing more is
    /// read or handed up.
    Over,
}

/// The layer's end of a child's socket pair.
struct Pipe {
    ours: UnixStream,
    /// What the loop watches it for.
    watched: Interest,
    /// The child closed its output: `close_notify` was queued.
    child_done: bool,
    /// The client's end of input was passed on (shutdown of our writing side).
    client_done: bool,
    /// The last write to it would have blocked: plaintext waits in rustls.
    full: bool,
}

/// What follows the flush of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Close the connection with this reason.
    Close(CloseReason),
    /// Half-close: FIN after `close_notify`.
    ShutdownWrite,
}

/// The callback the loop made.
#[derive(Debug, Clone, Copy)]
enum Call {
    Readable,
    Writable,
    Extra(RawFd, Ready),
    Timer,
    /// The drain notice (`Session::on_drain`), passed to the service's session.
    Drain,
}

/// rustls's plaintext side as the session's byte stream.
struct Plain<'a>(&'a mut ServerConnection);

impl Read for Plain<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.reader().read(buf)
    }
}

impl Write for Plain<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.writer().write(buf)? {
            // rustls's buffer is full (SEND_BUFFER): the session waits for the socket.
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsSession {
    pub(super) fn new(
        acceptor: Rc<Acceptor>,
        peer: Peer,
        bound: Option<SocketAddr>,
    ) -> Result<Self, rustls::Error> {
        let mut conn = ServerConnection::new(acceptor.config.clone())?;
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Ok(TlsSession {
            acceptor,
            conn,
            peer,
            bound,
            stage: Stage::Fresh,
            eof: false,
            pending: false,
            after: None,
            closing: false,
            info: None,
        })
    }

    /// One callback: records in, handshake progress, plaintext up and down, records out,
    /// and what the session asked for.
    fn turn(&mut self, cx: &mut Context<'_>, call: Call) -> io::Result<Progress> {
        let mut progress = Progress::default();
        if let Stage::Fresh = self.stage {
            self.stage = Stage::Handshake;
            if let Some(timeout) = self.acceptor.handshake_timeout {
                cx.set_timer(Some(cx.now() + timeout));
            }
        }
        if let (Stage::Handshake, Call::Timer) = (&self.stage, call) {
            return Ok(self.fail(cx, TlsFailure::Timeout, progress));
        }
        let mut arrived = false;
        if matches!(call, Call::Readable) && !matches!(self.stage, Stage::Over) && !self.closing {
            match self.read_records(cx, &mut progress) {
                Ok(got) => arrived = got,
                Err(error) => return self.tls_error(cx, error, progress),
            }
        }
        if let Stage::Handshake = self.stage {
            if self.conn.is_handshaking() {
                if self.eof {
                    return Ok(self.fail(cx, TlsFailure::Closed, progress));
                }
            } else {
                self.start_service(cx)?;
                arrived = true;
            }
        }
        self.serve(cx, call, arrived, &mut progress)?;
        self.flush(cx, &mut progress)?;
        if let Some(after) = self.after
            && !self.conn.wants_write()
        {
            self.after = None;
            match after {
                After::Close(reason) => cx.close(reason),
                After::ShutdownWrite => cx.shutdown_write(),
            }
        }
        Ok(progress)
    }

    /// Reads and processes records while rustls wants them; whether any came.
    fn read_records(
        &mut self,
        cx: &mut Context<'_>,
        progress: &mut Progress,
    ) -> Result<bool, Failure> {
        let mut arrived = false;
        for _ in 0..READS_PER_CALL {
            if self.eof || !self.conn.wants_read() {
                break;
            }
            match self.conn.read_tls(cx.io()) {
                Ok(0) => self.eof = true,
                Ok(n) => progress.bytes_in += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            }
            arrived = true;
            self.conn.process_new_packets().map_err(Failure::Tls)?;
        }
        Ok(arrived)
    }

    /// The handshake completed: count it, gather its facts, make the service's session.
    fn start_service(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        cx.set_timer(None);
        let resumed = self.conn.handshake_kind() == Some(HandshakeKind::Resumed);
        self.acceptor.completed(resumed);
        let info = facts(&self.conn, resumed);
        let local = match self.bound {
            Some(bound) => Some(bound),
            None => cx.socket().and_then(|socket| {
                socket2::SockRef::from(&socket).local_addr().ok().and_then(|a| a.as_socket())
            }),
        };
        let acceptor = self.acceptor.clone();
        let (session, pipe) = if acceptor.service.passes_socket() {
            let (ours, theirs) = UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            let conn = ConnInfo {
                listener: &acceptor.listener,
                peer: self.peer,
                socket: theirs.as_fd(),
                bound: local,
                tls: Some(&info),
            };
            let session = acceptor.service.session(&conn);
            // The child has its copy: ours would hide its exit from `ours`.
            drop(theirs);
            cx.watch(ours.as_fd(), Interest::READ)?;
            let pipe = Pipe {
                ours,
                watched: Interest::READ,
                child_done: false,
                client_done: false,
                full: false,
            };
            (session, Some(pipe))
        } else {
            let Some(socket) = cx.socket() else {
                return Err(io::Error::other("no client socket outside the daemon"));
            };
            let conn = ConnInfo {
                listener: &acceptor.listener,
                peer: self.peer,
                socket,
                bound: local,
                tls: Some(&info),
            };
            (acceptor.service.session(&conn), None)
        };
        self.info = Some(info);
        self.stage = Stage::Serving { session, pipe };
        Ok(())
    }

    /// Hands plaintext to the service's session (or its child) and lets it write.
    fn serve(
        &mut self,
        cx: &mut Context<'_>,
        call: Call,
        arrived: bool,
        progress: &mut Progress,
    ) -> io::Result<()> {
        let Stage::Serving { session, pipe } = &mut self.stage else { return Ok(()) };
        if self.closing {
            return Ok(());
        }
        if let Some(pipe) = pipe {
            // The session's own descriptors (exec's child, its stderr) are its business.
            if let Call::Extra(fd, ready) = call
                && fd != pipe.ours.as_raw_fd()
            {
                let (result, requests) = cx.layered(&mut Plain(&mut self.conn), |inner| {
                    session.on_extra(fd, ready, inner)
                });
                progress.exchanges += result?.exchanges;
                return self.carry_out(cx, requests);
            }
            if let Call::Timer | Call::Drain = call {
                let (result, requests) = cx.layered(&mut Plain(&mut self.conn), |inner| {
                    if let Call::Drain = call {
                        session.on_drain(inner)
                    } else {
                        session.on_timer(inner)
                    }
                });
                progress.exchanges += result?.exchanges;
                return self.carry_out(cx, requests);
            }
            if session.interest().write {
                // exec's first callback, which watches the child.
                let (result, requests) =
                    cx.layered(&mut Plain(&mut self.conn), |inner| session.on_writable(inner));
                progress.exchanges += result?.exchanges;
                self.carry_out(cx, requests)?;
            }
            return self.pump(cx);
        }
        let mut requests = Requests::default();
        match call {
            Call::Extra(fd, ready) => {
                let (result, asked) = cx.layered(&mut Plain(&mut self.conn), |inner| {
                    session.on_extra(fd, ready, inner)
                });
                progress.exchanges += result?.exchanges;
                merge(&mut requests, asked);
            }
            Call::Timer => {
                let (result, asked) =
                    cx.layered(&mut Plain(&mut self.conn), |inner| session.on_timer(inner));
                progress.exchanges += result?.exchanges;
                merge(&mut requests, asked);
            }
            Call::Drain => {
                let (result, asked) =
                    cx.layered(&mut Plain(&mut self.conn), |inner| session.on_drain(inner));
                progress.exchanges += result?.exchanges;
                merge(&mut requests, asked);
            }
            Call::Readable | Call::Writable => {}
        }
        let mut input = arrived || self.pending;
        for _ in 0..CALLS_PER_CALL {
            if requests.close.is_some() {
                break;
            }
            let interest = session.interest();
            let read = interest.read && input;
            let write = interest.write && !self.conn.wants_write();
            if !read && !write {
                break;
            }
            if read {
                let (result, asked) =
                    cx.layered(&mut Plain(&mut self.conn), |inner| session.on_readable(inner));
                progress.exchanges += result?.exchanges;
                merge(&mut requests, asked);
            }
            if write && requests.close.is_none() && session.interest().write {
                let (result, asked) =
                    cx.layered(&mut Plain(&mut self.conn), |inner| session.on_writable(inner));
                progress.exchanges += result?.exchanges;
                merge(&mut requests, asked);
            }
            // Records read again if the session made room and more are in the socket.
            input = input_waiting(&mut self.conn, self.eof);
            if !input && !session.interest().write {
                break;
            }
        }
        self.pending = input_waiting(&mut self.conn, self.eof)
            && matches!(&self.stage, Stage::Serving { session, .. } if session.interest().read);
        let done = matches!(&self.stage, Stage::Serving { session, .. } if session.is_done());
        if done && requests.close.is_none() {
            // The client ended and every answer is written: end ours too.
            self.conn.send_close_notify();
        }
        self.carry_out(cx, requests)
    }

    /// Carries out what the session asked: a close or half-close after `close_notify` and
    /// every record, a reset at once, its timer.
    fn carry_out(&mut self, cx: &mut Context<'_>, requests: Requests) -> io::Result<()> {
        if let Some(timer) = requests.timer {
            cx.set_timer(timer);
        }
        if requests.uncount {
            cx.uncount();
        }
        match requests.close {
            Some((reason, Ending::Reset)) => {
                self.closing = true;
                cx.reset(reason);
            }
            Some((reason, Ending::Graceful)) => {
                if let Stage::Serving { pipe: Some(pipe), .. } = &mut self.stage {
                    // The child is gone: what it wrote last goes out before the close.
                    drain_pipe(pipe, &mut self.conn)?;
                }
                self.conn.send_close_notify();
                self.after = Some(After::Close(reason));
                self.closing = true;
            }
            None if requests.shutdown_write => {
                self.conn.send_close_notify();
                if self.after.is_none() {
                    self.after = Some(After::ShutdownWrite);
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Moves plaintext between rustls and a child's socket pair.
    fn pump(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Stage::Serving { pipe: Some(pipe), .. } = &mut self.stage else { return Ok(()) };
        if self.closing {
            return Ok(());
        }
        // Client to child, straight out of rustls's buffer.
        pipe.full = false;
        loop {
            let mut reader = self.conn.reader();
            match reader.fill_buf() {
                Ok([]) => {
                    // The client's close_notify: the child reads end-of-file.
                    if !pipe.client_done {
                        pipe.client_done = true;
                        let _ = pipe.ours.shutdown(std::net::Shutdown::Write);
                    }
                    break;
                }
                Ok(chunk) => match (&pipe.ours).write(chunk) {
                    Ok(n) => reader.consume(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        pipe.full = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The child no longer reads: what the client sends is dropped.
                    Err(_) => {
                        let len = chunk.len();
                        reader.consume(len);
                        pipe.client_done = true;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A TCP end without close_notify: the child reads end-of-file all the same.
                Err(_) => {
                    if !pipe.client_done {
                        pipe.client_done = true;
                        let _ = pipe.ours.shutdown(std::net::Shutdown::Write);
                    }
                    break;
                }
            }
        }
        // Child to client, while rustls has room.
        if !pipe.child_done && !self.conn.wants_write() {
            let mut chunk = [0u8; PIPE_CHUNK];
            match (&pipe.ours).read(&mut chunk) {
                Ok(0) => {
                    pipe.child_done = true;
                    self.conn.send_close_notify();
                    self.after.get_or_insert(After::ShutdownWrite);
                }
                Ok(n) => self.conn.writer().write_all(&chunk[..n])?,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        let wanted = Interest {
            read: !pipe.child_done && !self.conn.wants_write(),
            write: pipe.full,
            exclusive: false,
        };
        if wanted != pipe.watched {
            cx.watch(pipe.ours.as_fd(), wanted)?;
            pipe.watched = wanted;
        }
        Ok(())
    }

    /// Writes records to the socket until rustls has none or the socket is full.
    fn flush(&mut self, cx: &mut Context<'_>, progress: &mut Progress) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(cx.io()) {
                Ok(n) => progress.bytes_out += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A record could not be read or processed.
    fn tls_error(
        &mut self,
        cx: &mut Context<'_>,
        failure: Failure,
        mut progress: Progress,
    ) -> io::Result<Progress> {
        match (&self.stage, failure) {
            (Stage::Handshake, Failure::Tls(error)) => {
                let reason = classify(&error);
                // The alert rustls queued, best effort.
                let _ = self.flush(cx, &mut progress);
                Ok(self.fail(cx, reason, progress))
            }
            (Stage::Handshake, Failure::Io(_)) => Ok(self.fail(cx, TlsFailure::Closed, progress)),
            (_, Failure::Io(error)) => Err(error),
            (_, Failure::Tls(error)) => {
                let _ = self.flush(cx, &mut progress);
                Err(io::Error::new(io::ErrorKind::InvalidData, error))
            }
        }
    }

    /// Ends a failed handshake: closed with its reason (the worker counts it by that reason).
    fn fail(&mut self, cx: &mut Context<'_>, failure: TlsFailure, progress: Progress) -> Progress {
        self.stage = Stage::Over;
        cx.set_timer(None);
        cx.close(CloseReason::Handshake(failure));
        progress
    }
}

/// Whether a read of the plaintext would return something: bytes, or the client's end
/// (`close_notify`, or `eof`: the TCP end without it), which a session must see as a plain
/// socket's end-of-file.
fn input_waiting(conn: &mut ServerConnection, eof: bool) -> bool {
    eof || conn
        .process_new_packets()
        .is_ok_and(|state| state.plaintext_bytes_to_read() > 0 || state.peer_has_closed())
}

/// A failure to read records: the socket's, or rustls's.
enum Failure {
    Io(io::Error),
    Tls(rustls::Error),
}

/// Adds what a later call asked to what earlier ones did (a later close wins).
fn merge(into: &mut Requests, asked: Requests) {
    if asked.close.is_some() {
        into.close = asked.close;
    }
    if asked.timer.is_some() {
        into.timer = asked.timer;
    }
    into.shutdown_write |= asked.shutdown_write;
    into.uncount |= asked.uncount;
}

/// Reads what the child left in its socket pair into rustls (it has exited: all it wrote
/// is there).
fn drain_pipe(pipe: &mut Pipe, conn: &mut ServerConnection) -> io::Result<()> {
    let mut chunk = [0u8; PIPE_CHUNK];
    for _ in 0..SEND_BUFFER / PIPE_CHUNK {
        match (&pipe.ours).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                if conn.writer().write(&chunk[..n])? < n {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// The failure reason of a handshake rustls refused.
fn classify(error: &rustls::Error) -> TlsFailure {
    use rustls::{Error, InvalidMessage};
    match error {
        Error::InvalidMessage(
            InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
        ) => TlsFailure::NotTls,
        Error::InvalidMessage(InvalidMessage::MessageTooLarge) => TlsFailure::TooLarge,
        Error::NoCertificatesPresented => TlsFailure::NoClientCertificate,
        Error::InvalidCertificate(_) => TlsFailure::BadClientCertificate,
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => TlsFailure::Incompatible,
        Error::AlertReceived(_) => TlsFailure::ClientAlert,
        _ => TlsFailure::Protocol,
    }
}

/// What the handshake settled.
fn facts(conn: &ServerConnection, resumed: bool) -> TlsInfo {
    let protocol = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let cipher = conn.negotiated_cipher_suite().map_or("unknown", |s| iana_name(s.suite()));
    let client_certificate = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| X509Certificate::from_der(der).ok())
        .map(|(_, certificate)| ClientCertificate {
            subject: rfc4514(certificate.subject()),
            issuer: rfc4514(certificate.issuer()),
            serial: serial_hex(certificate.raw_serial()),
        });
    TlsInfo {
        protocol,
        cipher,
        server_name: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        resumed,
        client_certificate,
    }
}

/// A cipher suite's IANA name (rustls names the TLS 1.3 ones `TLS13_...`).
fn iana_name(suite: CipherSuite) -> &'static str {
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        other => other.as_str().unwrap_or("unknown"),
    }
}

/// A distinguished name as RFC 4514 writes it (most specific first: `CN=a,O=b,C=c`), as
/// mod_ssl's `SSL_CLIENT_S_DN` does.
fn rfc4514(name: &X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for rdn in name.iter_rdn().collect::<Vec<_>>().into_iter().rev() {
        if !out.is_empty() {
            out.push(',');
        }
        for (index, attribute) in rdn.iter().enumerate() {
            if index > 0 {
                out.push('+');
            }
            let oid = attribute.attr_type();
            match x509_parser::objects::oid2abbrev(oid, registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&oid.to_id_string()),
            }
            out.push('=');
            match attribute.as_str() {
                Ok(value) => escape_value(value, &mut out),
                Err(_) => {
                    out.push('#');
                    for byte in attribute.attr_value().data.iter() {
                        let _ = write!(out, "{byte:02x}");
                    }
                }
            }
        }
    }
    out
}

/// An attribute value escaped as RFC 4514 section 2.4 says.
fn escape_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (index, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (index == 0 && (c == '#' || c == ' '))
            || (index == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
}

/// A serial number as OpenSSL prints it: uppercase hexadecimal, without sign padding.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    })
}

impl Session for TlsSession {
    fn interest(&self) -> Interest {
        let records = |read: bool| Interest {
            read: read && !self.eof && self.conn.wants_read(),
            write: self.conn.wants_write(),
            exclusive: false,
        };
        match &self.stage {
            // One callback at once, to set the handshake's deadline.
            Stage::Fresh => Interest::WRITE,
            Stage::Handshake => records(true),
            Stage::Over => records(false),
            Stage::Serving { .. } if self.closing => Interest {
                read: false,
                write: self.conn.wants_write() || self.after.is_some(),
                exclusive: false,
            },
            Stage::Serving { session, pipe } => {
                let mut interest = records(true);
                if pipe.is_none() {
                    // Plaintext waiting for the session: called back at once (a new socket is
                    // writable), since the socket's readiness no longer tells.
                    interest.write |= self.pending
                        || (session.interest().write && !self.conn.wants_write())
                        || self.after.is_some();
                }
                interest
            }
        }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.turn(cx, Call::Readable)
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.turn(cx, Call::Writable)
    }

    fn on_extra(&mut self, fd: RawFd, ready: Ready, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.turn(cx, Call::Extra(fd, ready))
    }

    fn on_timer(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.turn(cx, Call::Timer)
    }

    /// Passed to the service's session once the handshake is done (before, there is none
    /// to tell).
    fn on_drain(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.turn(cx, Call::Drain)
    }

    fn is_at_rest(&self) -> bool {
        match &self.stage {
            Stage::Fresh => true,
            Stage::Handshake => !self.conn.wants_write(),
            Stage::Serving { session, .. } => {
                session.is_at_rest() && !self.pending && !self.conn.wants_write()
            }
            Stage::Over => !self.conn.wants_write(),
        }
    }

    fn is_done(&self) -> bool {
        match &self.stage {
            Stage::Serving { session, pipe: None } => {
                session.is_done() && !self.conn.wants_write() && self.after.is_none()
            }
            _ => false,
        }
    }

    fn idle_timeouts(&self) -> bool {
        match &self.stage {
            Stage::Serving { session, .. } => session.idle_timeouts(),
            _ => true,
        }
    }

    fn process(&self) -> Option<u32> {
        match &self.stage {
            Stage::Serving { session, .. } => session.process(),
            _ => None,
        }
    }

    /// Its traffic keys live in this process: drained, never handed off.
    fn movable(&self) -> Movable {
        Movable::Never
    }

    fn closing(&mut self, socket: &mut dyn Transport) {
        if matches!(self.stage, Stage::Serving { .. }) {
            self.conn.send_close_notify();
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn describe(&self, line: &mut String) {
        if let Some(info) = &self.info {
            let version = info.protocol.strip_prefix("TLSv").unwrap_or(info.protocol);
            let _ = write!(line, " tls={version} cipher={}", info.cipher);
            if let Some(name) = &info.server_name {
                let _ = write!(line, " sni={name}");
            }
            let _ = write!(line, " resumed={}", u8::from(info.resumed));
        }
        if let Stage::Serving { session, .. } = &self.stage {
            session.describe(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_names_are_written_as_openssl_and_mod_ssl_do() {
        assert_eq!(serial_hex(&[0x00, 0x9f, 0x01]), "9F01");
        assert_eq!(serial_hex(&[0x00]), "00");
        let mut out = String::new();
        escape_value("a,b+c", &mut out);
        assert_eq!(out, "a\\,b\\+c");
        let mut out = String::new();
        escape_value(" x ", &mut out);
        assert_eq!(out, "\\ x\\ ");
    }
}
