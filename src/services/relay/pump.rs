//! One direction of a relayed connection: source -> bounded carrier -> sink.
//!
//! Runs in workers. A [`Pump`] owns what holds the bytes it has read and not yet written
//! ([`Carrier`]) and its own half-close state ([`Flow`]). The carrier is either a 16 KiB
//! buffer from the worker's pool ([`pool::BUFFER_SIZE`], read(2)/write(2)) or, when the relay
//! splices, a pipe from the relay's pipe pool ([`splice`], splice(2) socket -> pipe -> socket,
//! no copy through user space). Invariants, for both:
//! - bounded: the pump reads its source only while its carrier has room; with a full carrier
//!   it stops reading, so a slow sink holds back the source through TCP flow control
//!   (backpressure) and nothing grows with traffic;
//! - order: a pump holds one carrier at a time and changes it only when it is empty, so bytes
//!   leave in the order they came (the PROXY header, preloaded into a buffer, goes first and
//!   the pump splices only once it is written);
//! - an empty carrier goes back to its pool: an idle connection holds neither buffer nor pipe;
//! - a FIN read from the source ([`Flow::Flushing`]) is passed on by the session only once the
//!   carrier is empty ([`Pump::needs_shutdown`]);
//! - the bytes counted are those written to the sink.
//!
//! A hand-off moves a pump whole ([`Pump::export`], [`Pump::import`]): its flow, the bytes of
//! its buffer, or its pipe itself (the descriptors go along; the bytes stay in the kernel, so
//! no copy is made and no bound is exceeded) with the count it holds. A pump that holds a
//! pipe between callbacks always has bytes in it (a drained pipe goes back to its pool within
//! the callback), so the sender, which closes its copies once the receiver took them, never
//! pools a pipe the receiver uses.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

use super::splice::{self, Pipe};
use crate::services::pool;

/// Read/write (or splice) rounds per pump and callback, so one busy connection cannot starve
/// the others.
const ROUNDS: usize = 16;

/// How one direction of the relay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Reading the source, writing the sink.
    Open,
    /// The source sent FIN; the carried bytes are still being written.
    Flushing,
    /// FIN passed on to the sink: this direction is over.
    Shut,
}

/// A failure of one side of a pump.
#[derive(Debug)]
pub(super) enum Fault {
    /// Reading the source failed.
    Source(io::Error),
    /// Writing the sink failed.
    Sink(io::Error),
}

/// What holds the bytes a pump has read and not yet written.
#[derive(Debug)]
enum Carrier {
    /// Nothing in flight, and no buffer or pipe held.
    Idle,
    /// A pooled buffer; the unsent bytes are `buffer[start..end]`.
    Buffer { buffer: Vec<u8>, start: usize, end: usize },
    /// A pooled pipe holding `pending` bytes. `full`: splicing into it said `EAGAIN` while it
    /// held bytes, which is a full pipe (it counts pieces, not bytes) or an empty source; either
    /// way the pump waits for the sink to take some before it reads again, so a readable
    /// source cannot make the loop spin.
    Pipe { pipe: Pipe, pending: usize, full: bool },
}

/// One direction of the relay (see the module doc).
#[derive(Debug)]
pub(super) struct Pump {
    carrier: Carrier,
    /// Whether the pump splices when both ends are descriptors and a pipe can be had.
    splices: bool,
    /// The half-close state; the session moves it to [`Flow::Shut`].
    pub(super) flow: Flow,
}

impl Pump {
    /// A pump holding nothing; it splices if `splices` (the relay's `splice` option).
    pub(super) fn new(splices: bool) -> Pump {
        Pump { carrier: Carrier::Idle, splices, flow: Flow::Open }
    }

    /// Whether the pump would read its source now (open, and room in its carrier).
    pub(super) fn wants_input(&self) -> bool {
        self.flow == Flow::Open
            && match &self.carrier {
                Carrier::Idle => true,
                Carrier::Buffer { buffer, end, .. } => *end < buffer.len(),
                Carrier::Pipe { pipe, pending, full } => !*full && *pending < pipe.capacity(),
            }
    }

    /// Whether bytes wait to be written to the sink.
    pub(super) fn has_output(&self) -> bool {
        match &self.carrier {
            Carrier::Idle => false,
            Carrier::Buffer { start, end, .. } => start < end,
            Carrier::Pipe { pending, .. } => *pending > 0,
        }
    }

    /// The source sent FIN and every byte is written: time to shut the sink's write side.
    pub(super) fn needs_shutdown(&self) -> bool {
        self.flow == Flow::Flushing && !self.has_output()
    }

    /// Puts `bytes` (at most [`pool::BUFFER_SIZE`]) first in a buffer: the PROXY header. The
    /// pump is new and empty.
    pub(super) fn preload(&mut self, bytes: &[u8]) {
        let mut buffer = pool::take();
        buffer[..bytes.len()].copy_from_slice(bytes);
        self.release();
        self.carrier = Carrier::Buffer { buffer, start: 0, end: bytes.len() };
    }

    /// Whether this call should splice: the pump holds a pipe, or it splices, is empty and
    /// open, and a pipe can be had at `now` (then it holds one). Call only when both ends are
    /// descriptors, and then use [`Pump::splice`] if true, [`Pump::copy`] if false.
    pub(super) fn takes_pipe(&mut self, now: Instant) -> bool {
        match self.carrier {
            Carrier::Pipe { .. } => true,
            Carrier::Buffer { .. } => false,
            Carrier::Idle if !self.splices || self.flow != Flow::Open => false,
            Carrier::Idle => match splice::take(now) {
                Some(pipe) => {
                    self.carrier = Carrier::Pipe { pipe, pending: 0, full: false };
                    true
                }
                None => false,
            },
        }
    }

    /// Moves bytes from `source` to `sink` through a buffer until one would block, the
    /// buffer is full and the sink blocks, or [`ROUNDS`] rounds; returns the bytes written
    /// to the sink.
    pub(super) fn copy(&mut self, source: &mut dyn Read, sink: &mut dyn Write) -> Result<u64, Fault> {
        if matches!(self.carrier, Carrier::Idle) {
            if self.flow != Flow::Open {
                return Ok(0);
            }
            self.carrier = Carrier::Buffer { buffer: pool::take(), start: 0, end: 0 };
        }
        let Carrier::Buffer { buffer, start, end } = &mut self.carrier else {
            // A pipe is only taken when both ends are descriptors, and then `splice` runs.
            debug_assert!(false, "copy() called on a pump holding a pipe");
            return Ok(0);
        };
        let mut moved = 0;
        for _ in 0..ROUNDS {
            let mut more_input = false;
            if self.flow == Flow::Open {
                if *end == buffer.len() && *start > 0 {
                    buffer.copy_within(*start..*end, 0);
                    *end -= *start;
                    *start = 0;
                }
                if *end < buffer.len() {
                    match source.read(&mut buffer[*end..]) {
                        Ok(0) => self.flow = Flow::Flushing,
                        Ok(n) => {
                            // A full read means more may be waiting; a short one drained it.
                            more_input = *end + n == buffer.len();
                            *end += n;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => more_input = true,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(Fault::Source(e)),
                    }
                }
            }
            let mut flushed = true;
            while *start < *end {
                match sink.write(&buffer[*start..*end]) {
                    Ok(0) => return Err(Fault::Sink(ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        *start += n;
                        moved += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        flushed = false;
                        break;
                    }
                    Err(e) => return Err(Fault::Sink(e)),
                }
            }
            if *start == *end {
                *start = 0;
                *end = 0;
            }
            if !more_input || !flushed {
                break;
            }
        }
        if !self.has_output() {
            self.release();
        }
        Ok(moved)
    }

    /// Moves bytes from `source` to `sink` through the pump's pipe with splice(2) until one
    /// would block, the pipe is full and the sink blocks, or [`ROUNDS`] rounds; returns the
    /// bytes written to the sink. Call after [`Pump::takes_pipe`] said true.
    pub(super) fn splice(&mut self, source: BorrowedFd<'_>, sink: BorrowedFd<'_>) -> Result<u64, Fault> {
        let Carrier::Pipe { pipe, pending, full } = &mut self.carrier else {
            debug_assert!(false, "splice() called on a pump without a pipe");
            return Ok(0);
        };
        let mut moved = 0;
        for _ in 0..ROUNDS {
            let mut more_input = false;
            if self.flow == Flow::Open && !*full && *pending < pipe.capacity() {
                let room = pipe.capacity() - *pending;
                match splice::splice(source, pipe.input(), room) {
                    Ok(0) => self.flow = Flow::Flushing,
                    Ok(n) => {
                        // As for a read: all the room taken means more may be waiting.
                        more_input = n == room;
                        *pending += n;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => more_input = true,
                    // An empty source, or a pipe out of pieces: see `Carrier::Pipe`.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => *full = *pending > 0,
                    Err(e) => return Err(Fault::Source(e)),
                }
            }
            let mut flushed = true;
            while *pending > 0 {
                match splice::splice(pipe.output(), sink, *pending) {
                    Ok(0) => return Err(Fault::Sink(ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        *pending -= n;
                        *full = false;
                        moved += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        flushed = false;
                        break;
                    }
                    Err(e) => return Err(Fault::Sink(e)),
                }
            }
            if !more_input || !flushed {
                break;
            }
        }
        if !self.has_output() {
            self.release();
        }
        Ok(moved)
    }

    /// Gives the carrier back to its pool; a pipe that still holds bytes is closed instead.
    fn release(&mut self) {
        match std::mem::replace(&mut self.carrier, Carrier::Idle) {
            Carrier::Idle => {}
            Carrier::Buffer { buffer, .. } => pool::give(buffer),
            Carrier::Pipe { pipe, pending: 0, .. } => splice::give(pipe),
            Carrier::Pipe { .. } => {}
        }
    }
}

/// What a pipe carrier held when its pump was exported: attached to the pipe the descriptors
/// bring by [`Pump::attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PipeHeld {
    pending: usize,
    full: bool,
}

impl Pump {
    /// Appends the pump's state to `out`: its flow (1 byte: 0 open, 1 flushing, 2 shut), then
    /// its carrier (1 byte: 0 idle; 1 a buffer, followed by a 4-byte little-endian length and
    /// the unsent bytes; 2 a pipe, followed by the 4-byte count of bytes in it and 1 byte, 1
    /// if it is full). A pipe's descriptors are [`Pump::pipe_fds`].
    pub(super) fn export(&self, out: &mut Vec<u8>) {
        out.push(match self.flow {
            Flow::Open => 0,
            Flow::Flushing => 1,
            Flow::Shut => 2,
        });
        match &self.carrier {
            Carrier::Idle => out.push(0),
            Carrier::Buffer { buffer, start, end } => {
                out.push(1);
                out.extend(((end - start) as u32).to_le_bytes());
                out.extend(&buffer[*start..*end]);
            }
            Carrier::Pipe { pending, full, .. } => {
                out.push(2);
                out.extend((*pending as u32).to_le_bytes());
                out.push(u8::from(*full));
            }
        }
    }

    /// The pipe's descriptors (read end, write end), if the carrier is a pipe.
    pub(super) fn pipe_fds(&self) -> Option<[BorrowedFd<'_>; 2]> {
        match &self.carrier {
            Carrier::Pipe { pipe, .. } => Some([pipe.output(), pipe.input()]),
            _ => None,
        }
    }

    /// A pump from what [`Pump::export`] wrote at the start of `bytes`, which is advanced past
    /// it; `splices` as for [`Pump::new`]. A pipe carrier comes back empty, to be given its
    /// pipe with [`Pump::attach`] and the returned count. `None` when malformed.
    pub(super) fn import(bytes: &mut &[u8], splices: bool) -> Option<(Pump, Option<PipeHeld>)> {
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, rest) = bytes.split_at_checked(n)?;
            *bytes = rest;
            Some(head)
        };
        let flow = match take(1)?[0] {
            0 => Flow::Open,
            1 => Flow::Flushing,
            2 => Flow::Shut,
            _ => return None,
        };
        let mut pump = Pump::new(splices);
        pump.flow = flow;
        let held = match take(1)?[0] {
            0 => None,
            1 => {
                let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                if len == 0 || len > pool::BUFFER_SIZE {
                    return None;
                }
                let mut buffer = pool::take();
                buffer[..len].copy_from_slice(take(len)?);
                pump.carrier = Carrier::Buffer { buffer, start: 0, end: len };
                None
            }
            2 => {
                let pending = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                let full = match take(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                // A pipe between callbacks holds bytes (see the module doc).
                if pending == 0 {
                    return None;
                }
                Some(PipeHeld { pending, full })
            }
            _ => return None,
        };
        Some((pump, held))
    }

    /// Gives an imported pump its pipe (`read`, `write`: the descriptors of the exporter's
    /// pipe), holding what `held` says.
    ///
    /// # Errors
    /// The descriptors are not a pipe that can hold that much (`F_GETPIPE_SZ`).
    pub(super) fn attach(&mut self, read: OwnedFd, write: OwnedFd, held: PipeHeld) -> io::Result<()> {
        let pipe = Pipe::adopt(read, write)?;
        if held.pending > pipe.capacity() {
            return Err(io::Error::new(ErrorKind::InvalidData, "more bytes than the pipe holds"));
        }
        self.release();
        self.carrier = Carrier::Pipe { pipe, pending: held.pending, full: held.full };
        Ok(())
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::{Duration, Instant};

    use super::*;

    /// A connected loopback pair: the far end (blocking, the test's) and the near end
    /// (non-blocking, the pump's).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (near, _) = listener.accept().unwrap();
        near.set_nonblocking(true).unwrap();
        (far, near)
    }

    /// One callback's worth of pumping, choosing the path as the session does.
    fn drive(pump: &mut Pump, source: &TcpStream, sink: &TcpStream) -> u64 {
        let moved = if pump.takes_pipe(Instant::now()) {
            pump.splice(source.as_fd(), sink.as_fd())
        } else {
            pump.copy(&mut &*source, &mut &*sink)
        };
        moved.expect("no fault")
    }

    /// Drives `pump` until `done` or a deadline; the bytes moved.
    fn drive_until(pump: &mut Pump, source: &TcpStream, sink: &TcpStream, done: impl Fn(&Pump, u64) -> bool) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut moved = 0;
        while !done(pump, moved) {
            assert!(Instant::now() < deadline, "the pump got stuck");
            moved += drive(pump, source, sink);
            std::thread::yield_now();
        }
        moved
    }

    fn pattern(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn the_header_goes_first_then_bytes_are_spliced_in_order_then_fin_passes() {
        let (mut client, source) = pair();
        let (mut backend, sink) = pair();
        let mut pump = Pump::new(true);
        pump.preload(b"HEADER");
        client.write_all(b"hello ").unwrap();
        assert!(!pump.takes_pipe(Instant::now()), "no pipe while the header is in the buffer");
        let mut moved = drive_until(&mut pump, &source, &sink, |p, m| m >= 12 && !p.has_output());
        assert!(matches!(pump.carrier, Carrier::Idle), "the drained buffer went back");
        client.write_all(b"world").unwrap();
        assert!(pump.takes_pipe(Instant::now()), "empty: the pump splices now");
        moved += drive_until(&mut pump, &source, &sink, |_, m| m >= 5);
        assert!(matches!(pump.carrier, Carrier::Idle), "the drained pipe went back");
        client.shutdown(Shutdown::Write).unwrap();
        drive_until(&mut pump, &source, &sink, |p, _| p.flow == Flow::Flushing);
        assert!(pump.needs_shutdown(), "FIN read and nothing left: pass it on");
        assert_eq!(moved, 17, "the bytes written to the sink are counted, header included");
        let mut got = [0; 17];
        backend.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"HEADERhello world");
    }

    #[test]
    fn a_full_pipe_stops_reading_and_everything_arrives_once_the_sink_reads() {
        let (mut client, source) = pair();
        let (mut backend, sink) = pair();
        // Small socket buffers, so the pipe fills soon.
        socket2::SockRef::from(&sink).set_send_buffer_size(4096).unwrap();
        socket2::SockRef::from(&backend).set_recv_buffer_size(4096).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut pump = Pump::new(true);
        let mut written = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        // The backend reads nothing: feed the client until the pump refuses input.
        while pump.wants_input() {
            assert!(Instant::now() < deadline, "the pump never stopped reading");
            match client.write(&pattern(written, 16 * 1024)) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            drive(&mut pump, &source, &sink);
        }
        let Carrier::Pipe { pipe, pending, full } = &pump.carrier else { panic!("a pipe") };
        assert!(*pending > 0 && *pending <= pipe.capacity(), "bounded: {pending} bytes in the pipe");
        assert!(*full || *pending == pipe.capacity());
        assert!(pump.has_output(), "waits for the sink to be writable");
        let held = *pending;
        assert_eq!(drive(&mut pump, &source, &sink), 0, "the sink still blocks");
        assert!(matches!(pump.carrier, Carrier::Pipe { pending, .. } if pending == held), "nothing read");
        // Now the backend reads everything: it arrives intact and in order.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).unwrap();
            got
        });
        client.set_nonblocking(false).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        drive_until(&mut pump, &source, &sink, |p, _| p.needs_shutdown());
        sink.shutdown(Shutdown::Write).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got.len(), written);
        assert!(got == pattern(0, written), "the bytes arrived in order");
    }

    #[test]
    fn without_pipes_a_splicing_pump_relays_through_its_buffer() {
        let (mut client, source) = pair();
        let (mut backend, sink) = pair();
        let now = Instant::now();
        splice::exhaust(now);
        let mut pump = Pump::new(true);
        assert!(!pump.takes_pipe(now), "no pipe to be had (EMFILE)");
        client.write_all(b"still relayed").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut moved = 0;
        while moved < 13 {
            assert!(Instant::now() < deadline, "the pump got stuck");
            moved += pump.copy(&mut &source, &mut &sink).unwrap();
        }
        let mut got = [0; 13];
        backend.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still relayed");
        assert!(pump.takes_pipe(now + splice::RETRY_AFTER), "pipes again after RETRY_AFTER");
    }

    /// Fills `pump` from a client until it stops reading (its sink never reads), returning
    /// the client (non-blocking) and how many bytes it sent.
    fn fill(pump: &mut Pump, source: &TcpStream, sink: &TcpStream, client: &mut TcpStream) -> usize {
        socket2::SockRef::from(sink).set_send_buffer_size(4096).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut written = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pump.wants_input() || !pump.has_output() {
            assert!(Instant::now() < deadline, "the pump never filled");
            match client.write(&pattern(written, 16 * 1024)) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            drive(pump, source, sink);
        }
        written
    }

    /// Moves `pump` as a hand-off does: its state and duplicates of its pipe's descriptors
    /// into a new pump; the old one is dropped, as the sender drops its session.
    fn hand_over(pump: Pump, splices: bool) -> Pump {
        let mut state = Vec::new();
        pump.export(&mut state);
        let fds: Option<[OwnedFd; 2]> =
            pump.pipe_fds().map(|fds| fds.map(|fd| fd.try_clone_to_owned().unwrap()));
        drop(pump);
        let mut bytes = &state[..];
        let (mut moved, held) = Pump::import(&mut bytes, splices).expect("a valid state");
        assert!(bytes.is_empty(), "the whole state is read");
        match (fds, held) {
            (Some([read, write]), Some(held)) => moved.attach(read, write, held).unwrap(),
            (None, None) => {}
            _ => panic!("a pipe in the state iff the pump held one"),
        }
        moved
    }

    #[test]
    fn a_full_pump_moves_whole_and_its_bytes_arrive_once_in_order() {
        for splices in [false, true] {
            let (mut client, source) = pair();
            let (mut backend, sink) = pair();
            let mut pump = Pump::new(splices);
            let written = fill(&mut pump, &source, &sink, &mut client);
            assert_eq!(
                matches!(pump.carrier, Carrier::Pipe { .. }),
                splices,
                "splices through a pipe, or copies through a buffer"
            );
            let pooled = splice::pooled();
            let mut moved = hand_over(pump, splices);
            assert_eq!(splice::pooled(), pooled, "the sender's copy of a full pipe is not pooled");
            assert!(moved.has_output() && moved.flow == Flow::Open);
            // The rest of the stream, then FIN, through the moved pump only.
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                backend.read_to_end(&mut got).unwrap();
                got
            });
            client.set_nonblocking(false).unwrap();
            client.write_all(&pattern(written, 100_000)).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            drive_until(&mut moved, &source, &sink, |p, _| p.needs_shutdown());
            sink.shutdown(Shutdown::Write).unwrap();
            let got = reader.join().unwrap();
            assert_eq!(got.len(), written + 100_000, "splices: {splices}");
            assert!(got == pattern(0, written + 100_000), "in order, none lost or doubled");
        }
    }

    #[test]
    fn a_flushing_pump_moves_with_its_fin_and_malformed_states_are_refused() {
        let mut pump = Pump::new(false);
        pump.flow = Flow::Flushing;
        let mut state = Vec::new();
        pump.export(&mut state);
        assert_eq!(state, [1, 0], "flushing, idle");
        let moved = hand_over(pump, false);
        assert!(moved.needs_shutdown(), "the FIN read before the hand-off is passed on after");
        for bad in [&[][..], &[3, 0], &[0, 9], &[0, 1, 0, 0, 0, 0], &[0, 1, 5, 0, 0, 0, 1], &[0, 2, 0, 0, 0, 0, 0]] {
            let mut bytes = bad;
            assert!(Pump::import(&mut bytes, false).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_pipe_dropped_with_bytes_in_it_is_not_pooled() {
        let (mut client, source) = pair();
        let (_backend, sink) = pair();
        socket2::SockRef::from(&sink).set_send_buffer_size(4096).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut pump = Pump::new(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pump.has_output() || pump.wants_input() {
            assert!(Instant::now() < deadline, "the pipe never filled");
            let _ = client.write(&[7; 16 * 1024]);
            drive(&mut pump, &source, &sink);
        }
        let pooled = splice::pooled();
        drop(pump);
        assert_eq!(splice::pooled(), pooled, "closed, bytes and all");
    }
}
