//! [`Lines`]: a ready-made [`Session`] for line protocols (SMTP-, POP- or memcache-like), so
//! that a service written on preforkd's API only says what to answer to a line.
//!
//! Runs in workers. Input is split at LF (a CR before it is removed); each line goes to the
//! [`LineHandler`], whose answer is buffered and written before more input is read, so a
//! client that sends but never reads is held back by TCP flow control. A line longer than
//! the limit closes the connection (reason `line-too-long`).

use std::io::{self, ErrorKind};

use super::{CloseReason, Context, Interest, Progress, Session, write_some};

/// What to do after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineAction {
    /// Read the next line.
    Continue,
    /// Send what was answered so far, then end the conversation (reason `server-close`).
    Close,
}

/// A line protocol: what to send first, and what to answer to each line.
pub trait LineHandler {
    /// Appends what the server says on connect, before any input (a banner). Default: nothing.
    fn greeting(&mut self, out: &mut Vec<u8>) {
        let _ = out;
    }

    /// Appends the answer to `line` (without its CR LF or LF) to `out`.
    fn on_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> LineAction;

    /// The handler's state between lines, for a hand-off (see
    /// [`super::Session::export`]); [`Lines::import`] gives it back to the service's
    /// rebuild function. Default `None`: the connection is not handed off. A handler with
    /// no state returns `Some(Vec::new())`.
    fn export(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Hand-off state of [`Lines`], version 1: this byte, then the handler's own bytes.
const STATE_V1: u8 = 1;

/// Reads per callback at most (fairness).
const ROUNDS_PER_CALL: usize = 16;

/// A session that runs a [`LineHandler`]: one exchange per line answered.
#[derive(Debug)]
pub struct Lines<H> {
    handler: H,
    max_line: usize,
    /// Input not yet split into lines (no LF in it).
    input: Vec<u8>,
    /// Answers; `output[sent..]` is unsent.
    output: Vec<u8>,
    sent: usize,
    /// Lines handled whose answers are not fully written yet.
    unanswered: u64,
    peer_closed: bool,
    closing: bool,
}

impl<H: LineHandler> Lines<H> {
    /// A session for `handler`, with lines of at most `max_line` bytes (without the LF);
    /// its greeting is sent as soon as the connection is accepted.
    pub fn new(mut handler: H, max_line: usize) -> Self {
        let mut output = Vec::new();
        handler.greeting(&mut output);
        Lines {
            handler,
            max_line,
            input: Vec::new(),
            output,
            sent: 0,
            unanswered: 0,
            peer_closed: false,
            closing: false,
        }
    }

    /// Rebuilds a session handed off at rest from what its [`Session::export`] returned:
    /// `handler` rebuilds the handler from its own bytes (`None` refuses). No greeting is
    /// sent: the conversation goes on. `None` for an unknown version.
    pub fn import(
        state: &[u8],
        max_line: usize,
        handler: impl FnOnce(&[u8]) -> Option<H>,
    ) -> Option<Self> {
        let (&STATE_V1, own) = state.split_first()? else { return None };
        Some(Lines {
            handler: handler(own)?,
            max_line,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            unanswered: 0,
            peer_closed: false,
            closing: false,
        })
    }

    /// Hands every complete line in `input` to the handler; with `last`, the rest too.
    fn split(&mut self, last: bool) {
        let mut start = 0;
        while !self.closing {
            let Some(end) = self.input[start..].iter().position(|&b| b == b'\n') else { break };
            let mut line = &self.input[start..start + end];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            self.unanswered += 1;
            if self.handler.on_line(line, &mut self.output) == LineAction::Close {
                self.closing = true;
            }
            start += end + 1;
        }
        if last && start < self.input.len() && !self.closing {
            let rest = std::mem::take(&mut self.input);
            self.unanswered += 1;
            if self.handler.on_line(&rest[start..], &mut self.output) == LineAction::Close {
                self.closing = true;
            }
            return;
        }
        self.input.drain(..start);
    }

    fn flush(&mut self, cx: &mut Context<'_>, progress: &mut Progress) -> io::Result<()> {
        let n = write_some(cx, &self.output[self.sent..])?;
        self.sent += n;
        progress.bytes_out += n as u64;
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
            progress.exchanges += std::mem::take(&mut self.unanswered);
            if self.closing {
                cx.close(CloseReason::ServerClose);
            }
        }
        Ok(())
    }
}

impl<H: LineHandler> Session for Lines<H> {
    fn interest(&self) -> Interest {
        let pending = self.sent < self.output.len();
        Interest {
            read: !pending && !self.peer_closed && !self.closing,
            write: pending,
            exclusive: false,
        }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        let mut chunk = [0u8; 4096];
        for _ in 0..ROUNDS_PER_CALL {
            if self.peer_closed || self.closing || self.sent < self.output.len() {
                break;
            }
            match cx.io().read(&mut chunk) {
                Ok(0) => {
                    self.peer_closed = true;
                    self.split(true);
                }
                Ok(n) => {
                    progress.bytes_in += n as u64;
                    self.input.extend_from_slice(&chunk[..n]);
                    self.split(false);
                    if self.input.len() > self.max_line {
                        cx.close(CloseReason::Service("line-too-long"));
                        return Ok(progress);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
            self.flush(cx, &mut progress)?;
        }
        Ok(progress)
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        self.flush(cx, &mut progress)?;
        Ok(progress)
    }

    fn is_at_rest(&self) -> bool {
        self.input.is_empty() && self.sent == self.output.len()
    }

    fn is_done(&self) -> bool {
        self.peer_closed && self.sent == self.output.len()
    }

    fn export(&self) -> Option<Vec<u8>> {
        if !self.is_at_rest() || self.peer_closed || self.closing {
            return None;
        }
        let mut state = vec![STATE_V1];
        state.extend(self.handler.export()?);
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{Fake, call};

    struct Upper;

    impl LineHandler for Upper {
        fn greeting(&mut self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"hi\r\n");
        }
        fn on_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> LineAction {
            if line == b"QUIT" {
                out.extend_from_slice(b"bye\r\n");
                return LineAction::Close;
            }
            out.extend_from_slice(&line.to_ascii_uppercase());
            out.extend_from_slice(b"\r\n");
            LineAction::Continue
        }
    }

    #[test]
    fn greets_answers_each_line_and_closes_on_request() {
        let mut session = Lines::new(Upper, 16);
        assert_eq!(session.interest(), Interest::WRITE, "the server speaks first");
        let mut io = Fake::new(b"abc\r\nde", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (1, None));
        assert!(!session.is_at_rest(), "half a line is in flight");
        io.input.extend(b"f\nQUIT\nignored\n");
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (2, Some(CloseReason::ServerClose)));
        assert_eq!(io.output, b"hi\r\nABC\r\nDEF\r\nbye\r\n");
    }

    #[test]
    fn hands_off_between_lines_only_when_the_handler_can() {
        struct Counter(u8);
        impl LineHandler for Counter {
            fn on_line(&mut self, _line: &[u8], out: &mut Vec<u8>) -> LineAction {
                self.0 += 1;
                out.push(b'0' + self.0);
                LineAction::Continue
            }
            fn export(&self) -> Option<Vec<u8>> {
                Some(vec![self.0])
            }
        }
        let mut session = Lines::new(Counter(0), 16);
        let mut io = Fake::new(b"a\nb", false, usize::MAX);
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(session.export(), None, "half a line is in flight");
        io.input.extend(b"\n");
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        let state = session.export().expect("between lines");
        let mut moved = Lines::import(&state, 16, |own| Some(Counter(own[0]))).unwrap();
        io.input.extend(b"c\n");
        call(&mut io, |cx| moved.on_readable(cx)).unwrap();
        assert_eq!(io.output, b"123", "the count went on, no greeting again");
        assert!(Lines::import(&[9], 16, |_| Some(Counter(0))).is_none(), "unknown version");
        assert_eq!(Lines::new(Upper, 16).export(), None, "Upper keeps the default");
    }

    #[test]
    fn a_line_over_the_limit_closes_and_a_last_line_without_lf_is_answered() {
        let mut session = Lines::new(Upper, 4);
        let mut io = Fake::new(b"abcdefgh", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (_, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(close, Some(CloseReason::Service("line-too-long")));
        let mut session = Lines::new(Upper, 4);
        let mut io = Fake::new(b"ab", true, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert!(session.is_done());
        assert_eq!(io.output, b"hi\r\nAB\r\n");
    }
}
