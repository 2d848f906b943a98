//! Echo, RFC 862: everything received is sent back, byte for byte, until the client closes.
//!
//! One bounded buffer per connection ([`BUFFER_SIZE`]), taken from the worker's pool when
//! bytes arrive and given back once everything is echoed, so an idle connection holds none.
//! When it is full the session stops reading, so a client that sends but never reads is held
//! back by TCP flow control instead of growing the worker's memory. After the client's FIN,
//! what is buffered is still sent, then the session is done (half-close).

use std::io::{self, ErrorKind};

use super::pool;
use super::{Progress, Session, Transport};

/// Read/write rounds per callback, so that one fast client cannot starve the others.
const ROUNDS_PER_CALL: usize = 16;

/// An echo session.
#[derive(Debug, Default)]
pub struct Echo {
    /// From the pool while bytes are in flight; empty (no allocation) at rest.
    buffer: Vec<u8>,
    /// Unsent data is `buffer[start..end]`.
    start: usize,
    end: usize,
    /// Bytes read since the last completed exchange.
    unanswered: bool,
    peer_closed: bool,
}

impl Echo {
    /// A session with nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads what fits. True when the read filled the free space, so more may be waiting; a
    /// short read means the socket is drained, and the next read would only say
    /// `WouldBlock` (the poller is level-triggered: new data wakes the loop again).
    fn read_some(&mut self, io: &mut dyn Transport, progress: &mut Progress) -> io::Result<bool> {
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

    fn write_some(&mut self, io: &mut dyn Transport, progress: &mut Progress) -> io::Result<bool> {
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
    fn pump(&mut self, io: &mut dyn Transport) -> io::Result<Progress> {
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

impl Session for Echo {
    fn wants_read(&self) -> bool {
        !self.peer_closed
            && (self.buffer.is_empty() || self.start > 0 || self.end < self.buffer.len())
    }

    fn wants_write(&self) -> bool {
        self.start < self.end
    }

    fn on_readable(&mut self, io: &mut dyn Transport) -> io::Result<Progress> {
        self.pump(io)
    }

    fn on_writable(&mut self, io: &mut dyn Transport) -> io::Result<Progress> {
        self.pump(io)
    }

    fn is_at_rest(&self) -> bool {
        // Everything read was echoed. (Whether the socket holds more is the loop's to check.)
        self.start == self.end
    }

    fn is_done(&self) -> bool {
        self.peer_closed && self.start == self.end
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::{Read, Write};

    use super::*;
    use crate::services::pool::BUFFER_SIZE;

    /// A fake socket: `input` is what the client sent, `window` how much the client will
    /// accept before writes would block.
    struct Fake {
        input: VecDeque<u8>,
        eof: bool,
        output: Vec<u8>,
        window: usize,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return if self.eof { Ok(0) } else { Err(ErrorKind::WouldBlock.into()) };
            }
            let n = buf.len().min(self.input.len());
            for (slot, byte) in buf.iter_mut().zip(self.input.drain(..n)) {
                *slot = byte;
            }
            Ok(n)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.window);
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.window -= n;
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn echoes_and_counts_one_exchange() {
        let mut io = Fake {
            input: b"hello".iter().copied().collect(),
            eof: false,
            output: vec![],
            window: usize::MAX,
        };
        let mut echo = Echo::new();
        let progress = echo.on_readable(&mut io).unwrap();
        assert_eq!(io.output, b"hello");
        assert_eq!(progress, Progress { bytes_in: 5, bytes_out: 5, exchanges: 1 });
        assert!(echo.is_at_rest(), "everything read was answered");
        assert!(!echo.is_done());
    }

    #[test]
    fn stops_reading_when_the_client_does_not_read() {
        let data: Vec<u8> = (0..BUFFER_SIZE * 4).map(|i| (i * 7) as u8).collect();
        let mut io =
            Fake { input: data.iter().copied().collect(), eof: true, output: vec![], window: 0 };
        let mut echo = Echo::new();
        let progress = echo.on_readable(&mut io).unwrap();
        assert_eq!(progress.bytes_in, BUFFER_SIZE as u64, "reads at most one buffer");
        assert_eq!(progress.exchanges, 0);
        assert!(!echo.wants_read(), "full buffer: backpressure");
        assert!(echo.wants_write());
        assert!(!echo.is_at_rest());
        // The client reads: everything comes back in order, then the FIN ends the session.
        let mut rounds = 0;
        while !echo.is_done() {
            io.window = 1000;
            echo.on_writable(&mut io).unwrap();
            rounds += 1;
            assert!(rounds < 10_000);
        }
        assert_eq!(io.output, data);
    }
}
