//! [`Framed`]: a ready-made [`Session`] for request/response protocols, built from a
//! [`Decoder`] that finds frames in the input and a [`FrameHandler`] that answers each one,
//! so that a service written on preforkd's API says only what a frame is and what to answer.
//!
//! Runs in workers. The helper owns the connection's two buffers and does all of its I/O:
//! - after each read every complete frame is given to the handler, whose answers are
//!   appended to the output buffer and written at once. A connection with nothing buffered
//!   reads into the worker's one scratch buffer and handles its frames there, keeping only
//!   the start of a frame that has not all arrived: a connection at rest holds no input
//!   memory, and a request that arrives whole is never copied;
//! - backpressure: while more than the output bound (default [`DEFAULT_OUTPUT_BOUND`]) waits
//!   unsent, no frame is handled and nothing is read, so a client that sends but never reads
//!   is held back by TCP flow control and the worker's memory stays bounded (one answer may
//!   exceed the bound; the next waits);
//! - a frame longer than `max_frame` bytes (or announced so: [`Frame::Needs`]) closes the
//!   connection with reason `frame-too-long`; an input the decoder calls
//!   [`Frame::Invalid`] closes it with the decoder's reason; in both cases after what was
//!   answered before it is written, and after [`FrameHandler::on_error`] had its say;
//! - one *exchange* per frame, counted when its answer is fully written;
//! - hand-off: the session's state is its buffers, which the helper exports and imports
//!   itself; the handler adds its own state between frames ([`FrameHandler::export`]). So
//!   the connection moves at any moment, a request half read or an answer half written
//!   ([`Movable::Now`]), as long as its buffers fit a hand-off ([`super::MAX_EXPORT`]);
//! - the drain notice goes to the handler ([`FrameHandler::on_drain`]), whose goodbye is
//!   written like any answer.
//!
//! Invariants: `sent <= output.len()`; the input buffer holds no complete frame while the
//! session is open and under the output bound (each read handles all it can); a closing
//! session reads and handles nothing more.

mod frame;

use std::io::{self, ErrorKind};

pub use frame::{Decoder, Frame, lines, u16_prefixed, u32_prefixed};

use super::{CloseReason, Context, Interest, MAX_EXPORT, Movable, Progress, Session, write_some};

/// Unsent output above which [`Framed`] stops handling frames and reading, in bytes (64 KiB),
/// unless set with [`Framed::with_output_bound`].
pub const DEFAULT_OUTPUT_BOUND: usize = 64 * 1024;

/// Bytes of the worker's scratch buffer, the most one read into it takes.
const SCRATCH: usize = 16 * 1024;

/// Bytes a connection's own input buffer offers to each read at least.
const READ_CHUNK: usize = 4 * 1024;

/// Reads per callback at most, so one busy client does not hold the worker (fairness).
const ROUNDS_PER_CALL: usize = 16;

thread_local! {
    /// The worker's read buffer for connections with nothing buffered (each worker is one
    /// thread; a session runs to the end of its callback, so one buffer serves them all).
    static SCRATCH_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hand-off state of [`Framed`], version 1 (see [`Framed::import`]).
const STATE_V1: u8 = 1;

/// Bytes of [`Framed`]'s own hand-off state besides the buffers and the handler's bytes
/// (version, unanswered count, two lengths), and room left for the handler's.
const STATE_OVERHEAD: usize = 1 + 8 + 4 + 4 + 1024;

/// What to do after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameAction {
    /// Go on: handle the next frame.
    Continue,
    /// Send what was answered so far, then end the conversation (reason `server-close`);
    /// frames after this one are not handled.
    Close,
}

/// A request/response protocol over [`Framed`]: what to send first, and what to answer to
/// each frame. Every method runs in the worker between two reads and must not block.
pub trait FrameHandler {
    /// Appends what the server says on connect, before any input (a banner). Called once,
    /// when the session is made (not after a hand-off). Default: nothing.
    fn greeting(&mut self, out: &mut Vec<u8>) {
        let _ = out;
    }

    /// Appends the answer to `frame` (the [`Frame::Complete`] payload) to `out`.
    fn on_frame(&mut self, frame: &[u8], out: &mut Vec<u8>) -> FrameAction;

    /// The client closed its side (its FIN) with `rest` buffered, the start of a frame that
    /// will never be complete (empty if none). Appends what to answer, if anything, which is
    /// written before the connection closes. Default: nothing (the partial frame is dropped).
    fn on_end(&mut self, rest: &[u8], out: &mut Vec<u8>) {
        let _ = (rest, out);
    }

    /// The input broke the protocol and the connection is about to close with `reason`
    /// ([`Frame::Invalid`]'s, or `frame-too-long`): appends a last word, if the protocol has
    /// one (Redis says `-ERR Protocol error`). Default: nothing.
    fn on_error(&mut self, reason: &'static str, out: &mut Vec<u8>) {
        let _ = (reason, out);
    }

    /// The drain notice ([`Session::on_drain`]): the worker keeps this connection while it
    /// drains (a graceful stop, or a retirement this connection cannot move in). Appends a
    /// goodbye if the protocol has one; [`FrameAction::Close`] ends the conversation once
    /// what was answered and this are written. Called once at most, between frames.
    /// Default: nothing, and go on.
    fn on_drain(&mut self, out: &mut Vec<u8>) -> FrameAction {
        let _ = out;
        FrameAction::Continue
    }

    /// The handler's state between frames, for a hand-off (see [`Session::export`]);
    /// [`Framed::import`] gives it back to the service's rebuild function. Default `None`:
    /// the connection is not handed off. A handler with no state returns `Some(Vec::new())`.
    fn export(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Where the conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading and answering.
    Open,
    /// The client sent its FIN: what is answered is written, then the session is done.
    PeerClosed,
    /// The server ends it: what is answered is written, then the connection closes for
    /// this reason.
    Closing(CloseReason),
}

/// The input buffer: `buf[start..end]` holds what was read and not yet consumed.
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `n` bytes; an emptied buffer is given back to the allocator, so a
    /// connection at rest holds no input memory.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            *self = Inbox::default();
        }
    }

    /// Appends `bytes` (the start of a frame read into the scratch buffer).
    fn extend(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
            self.end += bytes.len();
        }
    }

    /// Room after the data for at least `want` bytes, moving the data to the front or
    /// growing the buffer if needed.
    fn spare(&mut self, want: usize) -> &mut [u8] {
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..]
    }
}

/// A session that runs a [`FrameHandler`] over the frames a [`Decoder`] finds: one exchange
/// per frame answered. See the [module documentation](self).
pub struct Framed<H> {
    handler: H,
    decode: Decoder,
    max_frame: usize,
    output_bound: usize,
    input: Inbox,
    /// Answers; `output[sent..]` is unsent.
    output: Vec<u8>,
    sent: usize,
    /// Frames handled whose answers are not fully written yet.
    unanswered: u64,
    /// The length a [`Frame::Needs`] announced, to make room for it in one go.
    expected: usize,
    stage: Stage,
}

impl<H> std::fmt::Debug for Framed<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framed")
            .field("buffered", &self.input.data().len())
            .field("unsent", &(self.output.len() - self.sent))
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl<H: FrameHandler> Framed<H> {
    /// A session for `handler`, whose frames `decode` finds, of at most `max_frame` bytes
    /// each (header and delimiter included); its greeting is sent as soon as the connection
    /// is accepted.
    pub fn new(mut handler: H, decode: Decoder, max_frame: usize) -> Self {
        let mut output = Vec::new();
        handler.greeting(&mut output);
        Framed::with_state(handler, decode, max_frame, Inbox::default(), output, 0)
    }

    fn with_state(
        handler: H,
        decode: Decoder,
        max_frame: usize,
        input: Inbox,
        output: Vec<u8>,
        unanswered: u64,
    ) -> Self {
        Framed {
            handler,
            decode,
            max_frame,
            output_bound: DEFAULT_OUTPUT_BOUND,
            input,
            output,
            sent: 0,
            unanswered,
            expected: 0,
            stage: Stage::Open,
        }
    }

    /// Sets the output bound: above this many unsent bytes, frames are not handled and
    /// nothing is read (backpressure). 0 handles one frame at a time, each answer written
    /// before the next frame is looked at.
    #[must_use]
    pub fn with_output_bound(mut self, bytes: usize) -> Self {
        self.output_bound = bytes;
        self
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Rebuilds a session handed off from what its [`Session::export`] returned: `handler`
    /// rebuilds the handler from its own bytes (`None` refuses). The buffers come back as
    /// they were; no greeting is sent: the conversation goes on. `None` for a state of
    /// another version or a malformed one.
    pub fn import(
        state: &[u8],
        decode: Decoder,
        max_frame: usize,
        handler: impl FnOnce(&[u8]) -> Option<H>,
    ) -> Option<Self> {
        let (&STATE_V1, rest) = state.split_first()? else { return None };
        let mut reader = StateReader(rest);
        let unanswered = reader.u64()?;
        let input = reader.bytes()?.to_vec();
        let output = reader.bytes()?.to_vec();
        let end = input.len();
        let input = Inbox { buf: input, start: 0, end };
        let handler = handler(reader.0)?;
        Some(Framed::with_state(handler, decode, max_frame, input, output, unanswered))
    }

    fn unsent(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Whether frames may be handled now: open, and under the output bound.
    fn handles(&self) -> bool {
        self.stage == Stage::Open && self.unsent() <= self.output_bound
    }

    /// Writes what is answered, then handles frames and writes their answers, again as long
    /// as writing brings the output under its bound with frames waiting.
    fn serve(&mut self, cx: &mut Context<'_>, progress: &mut Progress) -> io::Result<()> {
        self.flush(cx, progress)?;
        loop {
            let handled = self.handle_frames();
            // Also when none was: a close for an invalid frame is carried out here.
            self.flush(cx, progress)?;
            if handled == 0 {
                return Ok(());
            }
        }
    }

    /// Hands every complete frame in the buffered input to the handler, while
    /// [`Framed::handles`]. Returns how many.
    fn handle_frames(&mut self) -> usize {
        let mut input = std::mem::take(&mut self.input);
        let (handled, consumed) = self.handle(input.data());
        input.consume(consumed);
        self.input = input;
        handled
    }

    /// Hands every complete frame at the start of `input` to the handler, while
    /// [`Framed::handles`]. Returns how many, and the bytes they took.
    fn handle(&mut self, input: &[u8]) -> (usize, usize) {
        if self.sent > 0 {
            self.output.drain(..self.sent);
            self.sent = 0;
        }
        let (mut handled, mut consumed) = (0, 0);
        while self.handles() {
            let data = &input[consumed..];
            let (len, payload) = match (self.decode)(data) {
                Frame::Complete { len, payload }
                    if len >= 1
                        && len <= data.len()
                        && payload.start <= payload.end
                        && payload.end <= len =>
                {
                    (len, payload)
                }
                Frame::Complete { .. } => {
                    self.fail("bad-frame");
                    break;
                }
                Frame::Needs(len) if len <= self.max_frame => {
                    self.expected = len - data.len().min(len);
                    break;
                }
                Frame::Incomplete if data.len() <= self.max_frame => break,
                Frame::Needs(_) | Frame::Incomplete => {
                    self.fail("frame-too-long");
                    break;
                }
                Frame::Invalid(reason) => {
                    self.fail(reason);
                    break;
                }
            };
            if len > self.max_frame {
                self.fail("frame-too-long");
                break;
            }
            self.expected = 0;
            self.unanswered += 1;
            handled += 1;
            let action = self.handler.on_frame(&data[payload], &mut self.output);
            consumed += len;
            if action == FrameAction::Close {
                self.stage = Stage::Closing(CloseReason::ServerClose);
            }
        }
        (handled, consumed)
    }

    /// Reads into the worker's scratch buffer (nothing is buffered) and handles the frames
    /// there; keeps what is left, the start of a frame. Returns the read's result and the
    /// room it was offered.
    fn read_scratch(&mut self, cx: &mut Context<'_>) -> (io::Result<usize>, usize) {
        SCRATCH_BUFFER.with_borrow_mut(|scratch| {
            if scratch.len() < SCRATCH {
                scratch.resize(SCRATCH, 0);
            }
            let read = cx.io().read(scratch);
            if let Ok(n) = read {
                let (_, consumed) = self.handle(&scratch[..n]);
                self.input.extend(&scratch[consumed..n]);
            }
            (read, scratch.len())
        })
    }

    /// The input broke the protocol: the handler's last word, then a close for `reason`.
    fn fail(&mut self, reason: &'static str) {
        self.handler.on_error(reason, &mut self.output);
        self.stage = Stage::Closing(CloseReason::Service(reason));
    }

    /// The client's FIN: what is buffered goes to [`FrameHandler::on_end`].
    fn end(&mut self) {
        if self.stage != Stage::Open {
            return;
        }
        let rest = self.input.data();
        if !rest.is_empty() {
            self.unanswered += 1;
        }
        self.handler.on_end(rest, &mut self.output);
        let all = self.input.data().len();
        self.input.consume(all);
        self.stage = Stage::PeerClosed;
    }

    /// Writes what it can; once all is written, counts the exchanges and closes if the
    /// server ends the conversation.
    fn flush(&mut self, cx: &mut Context<'_>, progress: &mut Progress) -> io::Result<()> {
        if self.sent < self.output.len() {
            let n = write_some(cx, &self.output[self.sent..])?;
            self.sent += n;
            progress.bytes_out += n as u64;
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
            progress.exchanges += std::mem::take(&mut self.unanswered);
            if let Stage::Closing(reason) = self.stage {
                cx.close(reason);
            }
        }
        Ok(())
    }
}

impl<H: FrameHandler> Session for Framed<H> {
    fn interest(&self) -> Interest {
        let pending = self.sent < self.output.len();
        Interest { read: self.handles(), write: pending, exclusive: false }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        for _ in 0..ROUNDS_PER_CALL {
            if !self.handles() {
                break;
            }
            let (read, offered) = if self.input.is_empty() && self.expected == 0 {
                self.read_scratch(cx)
            } else {
                let room = self.input.spare(READ_CHUNK.max(self.expected));
                let offered = room.len();
                let read = cx.io().read(room);
                if let Ok(n) = read {
                    self.input.end += n;
                }
                (read, offered)
            };
            match read {
                Ok(0) => {
                    self.end();
                    self.flush(cx, &mut progress)?;
                    break;
                }
                Ok(n) => {
                    progress.bytes_in += n as u64;
                    self.serve(cx, &mut progress)?;
                    if n < offered {
                        // Most likely all there was: readiness is level-triggered, so more
                        // that arrived meanwhile brings the loop back without a read that
                        // would only say `WouldBlock`.
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        // Frames held back by the output bound are handled once it is written down.
        self.serve(cx, &mut progress)?;
        Ok(progress)
    }

    fn is_at_rest(&self) -> bool {
        self.input.is_empty() && self.sent == self.output.len()
    }

    fn is_done(&self) -> bool {
        self.stage == Stage::PeerClosed && self.sent == self.output.len()
    }

    fn on_drain(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        if self.stage == Stage::Open
            && self.handler.on_drain(&mut self.output) == FrameAction::Close
        {
            self.stage = Stage::Closing(CloseReason::ServerClose);
        }
        self.flush(cx, &mut progress)?;
        Ok(progress)
    }

    /// At any moment while open, its buffers travelling with it, unless they are too large
    /// for a hand-off just now (then after a later callback, once they have drained).
    fn movable(&self) -> Movable {
        let buffered = self.input.data().len() + self.unsent();
        if self.stage == Stage::Open && buffered + STATE_OVERHEAD <= MAX_EXPORT {
            Movable::Now
        } else {
            Movable::Later
        }
    }

    /// Version 1: the version byte, the unanswered frames (8 bytes), the buffered input and
    /// the unsent output (each a 4-byte length and the bytes, little-endian), then the
    /// handler's own bytes. Only while open: a closing session finishes where it is.
    fn export(&self) -> Option<Vec<u8>> {
        if self.stage != Stage::Open {
            return None;
        }
        let own = self.handler.export()?;
        let input = self.input.data();
        let output = &self.output[self.sent..];
        let mut state = Vec::with_capacity(1 + 8 + 8 + input.len() + output.len() + own.len());
        state.push(STATE_V1);
        state.extend(self.unanswered.to_le_bytes());
        for part in [input, output] {
            state.extend(u32::try_from(part.len()).ok()?.to_le_bytes());
            state.extend(part);
        }
        state.extend(own);
        (state.len() <= MAX_EXPORT).then_some(state)
    }
}

/// Reads a [`Framed`] hand-off state.
struct StateReader<'a>(&'a [u8]);

impl<'a> StateReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        self.take(usize::try_from(len).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{Fake, call};

    /// Greets, answers each frame in capitals, `QUIT` ends it, a last partial frame is
    /// answered too, and a protocol error gets `ERR`.
    struct Shout;

    impl FrameHandler for Shout {
        fn greeting(&mut self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"hi\r\n");
        }
        fn on_frame(&mut self, frame: &[u8], out: &mut Vec<u8>) -> FrameAction {
            if frame == b"QUIT" {
                out.extend_from_slice(b"bye\r\n");
                return FrameAction::Close;
            }
            out.extend_from_slice(&frame.to_ascii_uppercase());
            out.extend_from_slice(b"\r\n");
            FrameAction::Continue
        }
        fn on_end(&mut self, rest: &[u8], out: &mut Vec<u8>) {
            if !rest.is_empty() {
                self.on_frame(rest, out);
            }
        }
        fn on_error(&mut self, reason: &'static str, out: &mut Vec<u8>) {
            out.extend_from_slice(format!("ERR {reason}\r\n").as_bytes());
        }
    }

    #[test]
    fn greets_answers_each_frame_and_closes_on_request() {
        let mut session = Framed::new(Shout, lines, 16);
        assert!(session.interest().write, "the server speaks first");
        let mut io = Fake::new(b"abc\r\nde", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (1, None));
        assert!(!session.is_at_rest(), "half a line is in flight");
        io.input.extend(b"f\nQUIT\nignored\n");
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (2, Some(CloseReason::ServerClose)));
        assert_eq!(io.output, b"hi\r\nABC\r\nDEF\r\nbye\r\n");
        assert!(!session.interest().read, "nothing is read after the close");
    }

    #[test]
    fn a_frame_over_the_limit_closes_after_the_answers_and_the_last_word() {
        let mut session = Framed::new(Shout, lines, 4);
        let mut io = Fake::new(b"ab\nabcdefgh", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(close, Some(CloseReason::Service("frame-too-long")));
        assert_eq!(progress.exchanges, 1);
        assert_eq!(io.output, b"hi\r\nAB\r\nERR frame-too-long\r\n");
        // Announced too long by a length prefix: refused before it arrives.
        let mut session = Framed::new(Shout, u16_prefixed, 8);
        let mut io = Fake::new(b"\x00\x07", false, usize::MAX);
        let (_, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(close, Some(CloseReason::Service("frame-too-long")));
    }

    #[test]
    fn an_invalid_frame_closes_with_the_decoders_reason_and_a_bad_decoder_cannot_panic() {
        fn picky(input: &[u8]) -> Frame {
            match input.first() {
                None => Frame::Incomplete,
                Some(b'+') => Frame::whole(1),
                Some(b'!') => Frame::Complete { len: 5, payload: 0..1 }, // past the data
                Some(_) => Frame::Invalid("not-a-plus"),
            }
        }
        let mut session = Framed::new(Shout, picky, 64);
        let mut io = Fake::new(b"++x+", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (2, Some(CloseReason::Service("not-a-plus"))));
        assert_eq!(io.output, b"hi\r\n+\r\n+\r\nERR not-a-plus\r\n");
        let mut session = Framed::new(Shout, picky, 64);
        let mut io = Fake::new(b"!", false, usize::MAX);
        let (_, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(close, Some(CloseReason::Service("bad-frame")));
    }

    #[test]
    fn length_prefixed_frames_give_the_handler_their_payload() {
        let mut session = Framed::new(Shout, u32_prefixed, 64);
        let mut io = Fake::new(b"\x00\x00\x00\x02ab\x00\x00\x00\x03c", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, _) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(progress.exchanges, 1);
        io.input.extend(b"de");
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(io.output, b"hi\r\nAB\r\nCDE\r\n");
        assert!(session.is_at_rest());
    }

    #[test]
    fn over_the_output_bound_nothing_is_read_or_handled_until_the_client_reads() {
        let mut session = Framed::new(Shout, lines, 64).with_output_bound(4);
        // The client accepts 5 bytes, then nothing: "hi\r\n" and 1 byte of "A\r\n".
        let mut io = Fake::new(b"a\nb\nc\n", false, 5);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, _) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(progress.bytes_in, 6, "one read took it all");
        assert_eq!(progress.exchanges, 0, "no answer is fully written");
        // "A\r\n" and "B\r\n" were answered (6 bytes, over 4) and 5 are unsent: "c" waits in
        // the input, unhandled, and the socket is not read.
        assert_eq!(session.interest(), Interest::WRITE);
        assert!(!session.is_at_rest());
        io.input.extend(b"d\n");
        let (progress, _) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(progress, Progress::default(), "held back");
        io.window = usize::MAX;
        let (progress, _) = call(&mut io, |cx| session.on_writable(cx)).unwrap();
        assert_eq!(progress.exchanges, 3, "a, b, then c once the output drained");
        assert_eq!(io.output, b"hi\r\nA\r\nB\r\nC\r\n");
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(io.output, b"hi\r\nA\r\nB\r\nC\r\nD\r\n");
        assert!(session.is_at_rest());
    }

    #[test]
    fn at_the_clients_fin_the_rest_goes_to_on_end_and_the_session_is_done_once_written() {
        let mut session = Framed::new(Shout, lines, 16);
        let mut io = Fake::new(b"ab\ncd", true, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (1, None));
        assert!(!session.is_done(), "a short read: the FIN comes on the next call");
        let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!((progress.exchanges, close), (1, None));
        assert!(session.is_done());
        assert_eq!(io.output, b"hi\r\nAB\r\nCD\r\n");
        assert!(!session.interest().read);
    }

    #[test]
    fn the_drain_notice_is_the_handlers_goodbye_written_like_an_answer() {
        struct Polite;
        impl FrameHandler for Polite {
            fn on_frame(&mut self, _frame: &[u8], out: &mut Vec<u8>) -> FrameAction {
                out.extend_from_slice(b"ok\n");
                FrameAction::Continue
            }
            fn on_drain(&mut self, out: &mut Vec<u8>) -> FrameAction {
                out.extend_from_slice(b"going away\n");
                FrameAction::Close
            }
        }
        let mut session = Framed::new(Polite, lines, 64);
        let mut io = Fake::new(b"a\n", false, usize::MAX);
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        let (progress, close) = call(&mut io, |cx| session.on_drain(cx)).unwrap();
        assert_eq!((progress.bytes_out, close), (11, Some(CloseReason::ServerClose)));
        assert_eq!(io.output, b"ok\ngoing away\n");
        assert!(!session.interest().read, "nothing more is read");
        // The default: nothing said, the conversation goes on.
        let mut session = Framed::new(Shout, lines, 64);
        let mut io = Fake::new(b"", false, usize::MAX);
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        assert_eq!(call(&mut io, |cx| session.on_drain(cx)).unwrap(), (Progress::default(), None));
        assert!(session.interest().read);
    }

    #[test]
    fn it_moves_at_any_moment_while_open_and_its_buffers_fit() {
        let mut session = Framed::new(Shout, lines, MAX_EXPORT * 2);
        assert_eq!(session.movable(), Movable::Now, "a greeting unsent is carried along");
        let mut io = Fake::new(&vec![b'x'; MAX_EXPORT], false, usize::MAX);
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(session.movable(), Movable::Later, "a request too large to carry now");
        let mut closed = Framed::new(Shout, lines, 64);
        let mut io = Fake::new(b"QUIT\n", false, 0);
        call(&mut io, |cx| closed.on_readable(cx)).unwrap();
        assert_eq!(closed.movable(), Movable::Later, "closing: it finishes here");
    }

    #[test]
    fn hands_off_with_its_buffers_and_the_handlers_state() {
        struct Counter(u8);
        impl FrameHandler for Counter {
            fn on_frame(&mut self, _frame: &[u8], out: &mut Vec<u8>) -> FrameAction {
                self.0 += 1;
                out.push(b'0' + self.0);
                FrameAction::Continue
            }
            fn export(&self) -> Option<Vec<u8>> {
                Some(vec![self.0])
            }
        }
        let import = |state: &[u8]| Framed::import(state, lines, 16, |own| Some(Counter(own[0])));
        let mut session = Framed::new(Counter(0), lines, 16);
        // The client reads one byte, then stops: "2" is unsent and "c" half a line.
        let mut io = Fake::new(b"a\nb\nc", false, 1);
        call(&mut io, |cx| session.on_readable(cx)).unwrap();
        let state = session.export().expect("open: movable with its buffers");
        let mut moved = import(&state).unwrap();
        assert!(!moved.is_at_rest());
        assert!(moved.interest().write, "its unsent answer");
        io.window = usize::MAX;
        io.input.extend(b"\n");
        let (progress, _) = call(&mut io, |cx| moved.on_writable(cx)).unwrap();
        assert_eq!(progress.exchanges, 2, "both frames' answers were finished after the move");
        call(&mut io, |cx| moved.on_readable(cx)).unwrap();
        assert_eq!(io.output, b"123", "the count went on, no greeting again");
        assert!(import(&[9]).is_none(), "unknown version");
        assert!(import(&state[..state.len() - 3]).is_none(), "truncated");
        assert_eq!(Framed::new(Shout, lines, 16).export(), None, "Shout keeps the default");
        let mut closing = Framed::new(Counter(0), lines, 16);
        let mut io = Fake::new(b"a\n", true, usize::MAX);
        for _ in 0..2 {
            call(&mut io, |cx| closing.on_readable(cx)).unwrap();
        }
        assert_eq!(closing.export(), None, "the client closed: it finishes here");
    }
}
