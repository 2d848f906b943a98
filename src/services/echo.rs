//! Echo, RFC 862: everything received is sent back, byte for byte, until the client closes.
//!
//! One bounded buffer per connection ([`pool::BUFFER_SIZE`]), taken from the worker's pool
//! when bytes arrive and given back once everything is echoed, so an idle connection holds
//! none.
//! When it is full the session stops reading, so a client that sends but never reads is held
//! back by TCP flow control instead of growing the worker's memory. After the client's FIN,
//! what is buffered is still sent, then the session is done (half-close).
//!
//! Over UDP, each datagram is sent back unchanged to its source.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{
    Answer, ConnInfo, Context, DatagramService, Interest, Invalid, Options, Progress, Service,
    Session, pool,
};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "echo";

/// Builds the service; echo takes no options.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    options.expect_none(NAME)?;
    Ok(Arc::new(Echo::new()))
}

/// The echo service (RFC 862): every connection gets its own bounded buffer. No options.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Echo {
    /// The service.
    pub fn new() -> Self {
        Echo
    }
}

impl Service for Echo {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(EchoSession::default())
    }

    fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        (state == [STATE_V1]).then(|| Box::new(EchoSession::default()) as Box<dyn Session>)
    }

    fn datagram(&self) -> Result<&dyn DatagramService, &'static str> {
        Ok(self)
    }
}

/// RFC 862's UDP form: the datagram goes back as it came, so the reply is never larger than
/// the request (no amplification; the loop's rate limit caps reflection).
impl DatagramService for Echo {
    fn on_datagram(
        &self,
        request: &[u8],
        _peer: SocketAddr,
        _local: SocketAddr,
        _now: Instant,
        reply: &mut Vec<u8>,
    ) -> Answer {
        reply.extend_from_slice(request);
        Answer::Reply
    }
}

/// Hand-off state, version 1: one byte. At rest an echo session holds nothing else.
const STATE_V1: u8 = 1;

/// Read/write rounds per callback, so that one fast client cannot starve the others.
const ROUNDS_PER_CALL: usize = 16;

/// An echo session.
#[derive(Debug, Default)]
struct EchoSession {
    /// From the pool while bytes are in flight; empty (no allocation) at rest.
    buffer: Vec<u8>,
    /// Unsent data is `buffer[start..end]`.
    start: usize,
    end: usize,
    /// Bytes read since the last completed exchange.
    unanswered: bool,
    peer_closed: bool,
}

impl EchoSession {
    /// Reads what fits. True when the read filled the free space, so more may be waiting; a
    /// short read means the socket is drained, and the next read would only say
    /// `WouldBlock` (the poller is level-triggered: new data wakes the loop again).
    fn read_some(&mut self, io: &mut dyn super::Transport, progress: &mut Progress) -> io::Result<bool> {
        if self.peer_closed {
            return Ok(false);
        }
        if self.buffer.is_empty() {
            self.buffer = pool::take();
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buffer.len() && self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buffer.len() {
            return Ok(false);
        }
        loop {
            return match io.read(&mut self.buffer[self.end..]) {
                Ok(0) => {
                    self.peer_closed = true;
                    Ok(false)
                }
                Ok(n) => {
                    let filled = self.end + n == self.buffer.len();
                    self.end += n;
                    self.unanswered = true;
                    progress.bytes_in += n as u64;
                    Ok(filled)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(e),
            };
        }
    }

    fn write_some(&mut self, io: &mut dyn super::Transport, progress: &mut Progress) -> io::Result<bool> {
        while self.start < self.end {
            match io.write(&self.buffer[self.start..self.end]) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    self.start += n;
                    progress.bytes_out += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if self.unanswered {
            self.unanswered = false;
            progress.exchanges += 1;
        }
        Ok(true)
    }

    /// Read, echo, repeat, until the socket has nothing more or cannot take more.
    fn pump(&mut self, io: &mut dyn super::Transport) -> io::Result<Progress> {
        let mut progress = Progress::default();
        for _ in 0..ROUNDS_PER_CALL {
            let read = self.read_some(io, &mut progress)?;
            let flushed = self.write_some(io, &mut progress)?;
            if !read || !flushed {
                break;
            }
        }
        if self.start == self.end && !self.buffer.is_empty() {
            self.start = 0;
            self.end = 0;
            pool::give(std::mem::take(&mut self.buffer));
        }
        Ok(progress)
    }
}

impl Session for EchoSession {
    fn interest(&self) -> Interest {
        let read = !self.peer_closed
            && (self.buffer.is_empty() || self.start > 0 || self.end < self.buffer.len());
        Interest { read, write: self.start < self.end, exclusive: false }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.pump(cx.io())
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.pump(cx.io())
    }

    fn is_at_rest(&self) -> bool {
        // Everything read was echoed. (Whether the socket holds more is the loop's to check.)
        self.start == self.end
    }

    fn is_done(&self) -> bool {
        self.peer_closed && self.start == self.end
    }

    fn export(&self) -> Option<Vec<u8>> {
        (self.start == self.end && !self.peer_closed).then(|| vec![STATE_V1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::pool::BUFFER_SIZE;
    use crate::services::testing::{Fake, call};

    #[test]
    fn echoes_and_counts_one_exchange() {
        let mut io = Fake::new(b"hello", false, usize::MAX);
        let mut echo = EchoSession::default();
        let (progress, _) = call(&mut io, |cx| echo.on_readable(cx)).unwrap();
        assert_eq!(io.output, b"hello");
        assert_eq!(progress, Progress { bytes_in: 5, bytes_out: 5, exchanges: 1 });
        assert!(echo.is_at_rest(), "everything read was answered");
        assert!(!echo.is_done());
    }

    #[test]
    fn hands_off_only_at_rest_and_refuses_an_unknown_version() {
        let mut io = Fake::new(b"hello", false, 2);
        let mut echo = EchoSession::default();
        call(&mut io, |cx| echo.on_readable(cx)).unwrap();
        assert_eq!(echo.export(), None, "three bytes still to echo");
        io.window = usize::MAX;
        call(&mut io, |cx| echo.on_writable(cx)).unwrap();
        let state = echo.export().expect("at rest");
        let stdin = std::io::stdin();
        let socket = std::os::fd::AsFd::as_fd(&stdin);
        let info = ConnInfo { listener: "echo", peer: crate::net::Peer::Ip("127.0.0.1:1".parse().unwrap()), socket, bound: None, tls: None };
        assert!(Echo.import(&info, &state).is_some());
        assert!(Echo.import(&info, &[2]).is_none(), "a newer version is refused");
    }

    #[test]
    fn stops_reading_when_the_client_does_not_read() {
        let data: Vec<u8> = (0..BUFFER_SIZE * 4).map(|i| (i * 7) as u8).collect();
        let mut io = Fake::new(&data, true, 0);
        let mut echo = EchoSession::default();
        let (progress, _) = call(&mut io, |cx| echo.on_readable(cx)).unwrap();
        assert_eq!(progress.bytes_in, BUFFER_SIZE as u64, "reads at most one buffer");
        assert_eq!(progress.exchanges, 0);
        assert!(!echo.interest().read, "full buffer: backpressure");
        assert!(echo.interest().write);
        assert!(!echo.is_at_rest());
        // The client reads: everything comes back in order, then the FIN ends the session.
        let mut rounds = 0;
        while !echo.is_done() {
            io.window = 1000;
            call(&mut io, |cx| echo.on_writable(cx)).unwrap();
            rounds += 1;
            assert!(rounds < 10_000);
        }
        assert_eq!(io.output, data);
    }
}
