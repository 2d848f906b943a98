//! Character generator, RFC 864: an endless stream of 72-character lines, each the 95
//! printable ASCII characters (space to `~`) taken as a ring and started one character later
//! than the line before, ended by CR LF. Line 0 starts with the space, as BSD inetd's does.
//!
//! Data is sent only as fast as the client reads: the stream is a static table and the
//! session holds only its offset in it, so a client that never reads costs nothing but its
//! socket (the loop waits for writability, it does not spin). Input is read and thrown away;
//! the client's FIN stops the reading, not the stream, which ends when the client closes the
//! connection. An exchange is each complete line sent. No options.

use std::io::{self, ErrorKind};
use std::sync::Arc;

use super::{
    ConnInfo, Context, Interest, Invalid, Options, Progress, Service, Session, discard_input,
};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "chargen";

/// Characters per line, before CR LF (RFC 864's popular pattern).
pub const LINE_CHARS: usize = 72;
/// Bytes per line, with CR LF.
const LINE: usize = LINE_CHARS + 2;
/// The printable ASCII characters, space to `~`.
const RING: usize = 95;
/// The stream repeats after this many bytes (95 lines).
const PERIOD: usize = RING * LINE;
/// The table holds this many periods, so one write can send up to 9 periods from any offset.
const PERIODS: usize = 10;
/// Writes per callback at most (fairness).
const ROUNDS_PER_CALL: usize = 4;

/// [`PERIODS`] periods of the stream.
static STREAM: [u8; PERIOD * PERIODS] = stream();

const fn stream() -> [u8; PERIOD * PERIODS] {
    let mut bytes = [0u8; PERIOD * PERIODS];
    let mut line = 0;
    while line < RING * PERIODS {
        let mut column = 0;
        while column < LINE_CHARS {
            bytes[line * LINE + column] = b' ' + ((line + column) % RING) as u8;
            column += 1;
        }
        bytes[line * LINE + LINE_CHARS] = b'\r';
        bytes[line * LINE + LINE_CHARS + 1] = b'\n';
        line += 1;
    }
    bytes
}

/// Builds the service; chargen takes no options.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    options.expect_none(NAME)?;
    Ok(Arc::new(Chargen))
}

/// The character generator service (RFC 864).
#[derive(Debug, Default, Clone, Copy)]
pub struct Chargen;

impl Service for Chargen {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(ChargenSession { offset: 0, input_closed: false, peer_gone: false })
    }

    fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let [STATE_V1, a, b, c, d, closed @ (0 | 1)] = *state else { return None };
        let offset = u32::from_le_bytes([a, b, c, d]) as usize;
        (offset < PERIOD && offset.is_multiple_of(LINE)).then(|| {
            Box::new(ChargenSession { offset, input_closed: closed == 1, peer_gone: false })
                as Box<dyn Session>
        })
    }

    fn datagram(&self) -> Result<&dyn super::DatagramService, &'static str> {
        // RFC 864's UDP form answers any datagram with up to 512 bytes: a forged source
        // address turns it into a traffic amplifier (CVE-1999-0103).
        Err("a reply of up to 512 bytes to any datagram makes it an amplifier for spoofed requests")
    }
}

/// Hand-off state, version 1: this byte, the offset in the stream (u32, little-endian; at a
/// line boundary) and whether the client's FIN was read (0 or 1).
const STATE_V1: u8 = 1;

#[derive(Debug)]
struct ChargenSession {
    /// Next byte to send, in `0..PERIOD`.
    offset: usize,
    /// The client's FIN was read: stop reading, keep sending.
    input_closed: bool,
    /// The client closed the connection (a write failed with EPIPE or ECONNRESET).
    peer_gone: bool,
}

impl Session for ChargenSession {
    fn interest(&self) -> Interest {
        Interest { read: !self.input_closed, write: !self.peer_gone, exclusive: false }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let (bytes_in, eof) = discard_input(cx, ROUNDS_PER_CALL)?;
        self.input_closed |= eof;
        Ok(Progress { bytes_in, ..Progress::default() })
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        for _ in 0..ROUNDS_PER_CALL {
            match cx.io().write(&STREAM[self.offset..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    progress.bytes_out += n as u64;
                    let end = self.offset + n;
                    progress.exchanges += (end / LINE - self.offset / LINE) as u64;
                    self.offset = end % PERIOD;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The client closed the connection: the stream ends as RFC 864 says.
                Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                    self.peer_gone = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    fn is_at_rest(&self) -> bool {
        self.offset.is_multiple_of(LINE)
    }

    fn is_done(&self) -> bool {
        self.peer_gone
    }

    fn export(&self) -> Option<Vec<u8>> {
        if self.peer_gone || !self.is_at_rest() {
            return None;
        }
        let mut state = vec![STATE_V1];
        state.extend((self.offset as u32).to_le_bytes());
        state.push(u8::from(self.input_closed));
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{Fake, call};

    fn line(n: usize) -> String {
        let chars: String =
            (0..LINE_CHARS).map(|column| (b' ' + ((n + column) % RING) as u8) as char).collect();
        format!("{chars}\r\n")
    }

    #[test]
    fn the_rotating_pattern_of_rfc_864() {
        assert!(line(0).starts_with(" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg\r\n"));
        assert!(line(1).starts_with("!\"#$%&'"));
        assert!(line(94).starts_with("~ !\"#"));
        let mut io = Fake::new(b"ignored", false, LINE * 200 + 10);
        let mut session = ChargenSession { offset: 0, input_closed: false, peer_gone: false };
        let mut sent = Progress::default();
        while sent.bytes_out < (LINE * 200 + 10) as u64 {
            let (progress, _) = call(&mut io, |cx| session.on_writable(cx)).unwrap();
            sent.bytes_out += progress.bytes_out;
            sent.exchanges += progress.exchanges;
        }
        let expected: String = (0..201).map(line).collect();
        assert_eq!(io.output, expected.as_bytes()[..LINE * 200 + 10]);
        assert_eq!(sent.exchanges, 200, "one exchange per complete line");
        assert!(!session.is_at_rest(), "in the middle of line 200");
        // The window is shut: nothing more is sent and nothing is buffered.
        let (progress, _) = call(&mut io, |cx| session.on_writable(cx)).unwrap();
        assert_eq!(progress.bytes_out, 0);
        assert_eq!(session.offset, (LINE * 200 + 10) % PERIOD);
    }

    #[test]
    fn the_stream_goes_on_where_it_stopped_after_a_hand_off() {
        let mut io = Fake::new(b"", false, LINE * 3);
        let mut session = ChargenSession { offset: 0, input_closed: false, peer_gone: false };
        call(&mut io, |cx| session.on_writable(cx)).unwrap();
        let state = session.export().expect("at a line boundary");
        let stdin = std::io::stdin();
        let socket = std::os::fd::AsFd::as_fd(&stdin);
        let info = ConnInfo { listener: "c", peer: crate::net::Peer::Ip("127.0.0.1:1".parse().unwrap()), socket, bound: None, tls: None };
        let mut moved = Chargen.import(&info, &state).expect("version 1");
        io.window = LINE;
        call(&mut io, |cx| moved.on_writable(cx)).unwrap();
        let expected: String = (0..4).map(line).collect();
        assert_eq!(io.output, expected.as_bytes());
        assert!(Chargen.import(&info, &[1, 5, 0, 0, 0, 0]).is_none(), "not a line boundary");
        assert!(Chargen.import(&info, &[2, 0, 0, 0, 0, 0]).is_none(), "unknown version");
    }

    #[test]
    fn input_is_discarded_and_the_fin_stops_reading_only() {
        let mut io = Fake::new(b"hello", true, usize::MAX);
        let mut session = ChargenSession { offset: 0, input_closed: false, peer_gone: false };
        let (progress, _) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
        assert_eq!(progress.bytes_in, 5);
        assert_eq!(session.interest(), Interest { read: false, write: true, exclusive: false });
        assert!(!session.is_done());
    }
}
