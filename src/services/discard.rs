//! Discard, RFC 863: everything received is read and thrown away; nothing is sent.
//!
//! An exchange is each read that returned data, so a client that keeps sending is a long
//! (kept-alive) connection after its first bytes. The session holds no buffer: input is read
//! into the stack and dropped. No options.

use std::io;
use std::sync::Arc;

use super::{
    ConnInfo, Context, Interest, Invalid, Options, Progress, Service, Session, discard_input,
};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "discard";

/// Reads per callback at most, so that one fast client cannot starve the others.
const ROUNDS_PER_CALL: usize = 16;

/// Builds the service; discard takes no options.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    options.expect_none(NAME)?;
    Ok(Arc::new(Discard))
}

/// The discard service (RFC 863).
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl Service for Discard {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(DiscardSession { peer_closed: false })
    }

    fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        (state == [STATE_V1])
            .then(|| Box::new(DiscardSession { peer_closed: false }) as Box<dyn Session>)
    }

    fn datagram(&self) -> Result<&dyn super::DatagramService, &'static str> {
        Err("it never answers, so there is nothing to serve: drop the datagrams with a firewall rule instead")
    }
}

/// Hand-off state, version 1: one byte; a discard session holds nothing else.
const STATE_V1: u8 = 1;

/// A discard session: only whether the client has closed.
#[derive(Debug)]
struct DiscardSession {
    peer_closed: bool,
}

impl Session for DiscardSession {
    fn interest(&self) -> Interest {
        if self.peer_closed { Interest::NONE } else { Interest::READ }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let (bytes_in, eof) = discard_input(cx, ROUNDS_PER_CALL)?;
        self.peer_closed |= eof;
        Ok(Progress { bytes_in, bytes_out: 0, exchanges: u64::from(bytes_in > 0) })
    }

    fn on_writable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn is_at_rest(&self) -> bool {
        true
    }

    fn is_done(&self) -> bool {
        self.peer_closed
    }

    fn export(&self) -> Option<Vec<u8>> {
        (!self.peer_closed).then(|| vec![STATE_V1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{Fake, call};

    #[test]
    fn reads_everything_sends_nothing_and_ends_at_the_fin() {
        let mut io = Fake::new(&[7u8; 100_000], true, usize::MAX);
        let mut session = DiscardSession { peer_closed: false };
        let mut total = 0;
        while !session.is_done() {
            let (progress, close) = call(&mut io, |cx| session.on_readable(cx)).unwrap();
            assert_eq!(close, None);
            total += progress.bytes_in;
        }
        assert_eq!(total, 100_000);
        assert!(io.output.is_empty());
        assert!(session.is_at_rest());
    }
}
