//! Daytime, RFC 867: one line with the current date and time, then the server closes.
//!
//! The format is RFC 3339 in UTC to the second, ended by CR LF: `2026-11-22T03:04:05Z`
//! (RFC 867 leaves the syntax free; this one is unambiguous and machine-readable). The line is
//! taken at accept and sent at once, without waiting for input; input is thrown away. One
//! exchange. No options.
//!
//! Over UDP (RFC 867's second form), any datagram is answered with one datagram holding the
//! line; the request's content is ignored.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{
    CloseReason, ConnInfo, Context, DatagramService, Interest, Invalid, Options, Progress,
    Service, Session, write_some,
};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "daytime";

/// Builds the service; daytime takes no options.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    options.expect_none(NAME)?;
    Ok(Arc::new(Daytime))
}

/// The daytime service (RFC 867).
#[derive(Debug, Default, Clone, Copy)]
pub struct Daytime;

/// The daytime line for `now`: RFC 3339, UTC, seconds, CR LF.
pub fn daytime_line(now: SystemTime) -> String {
    format!("{}\r\n", humantime::format_rfc3339_seconds(now))
}

impl Service for Daytime {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(Answer::new(daytime_line(SystemTime::now()).into_bytes()))
    }

    fn datagram(&self) -> Result<&dyn DatagramService, &'static str> {
        Ok(self)
    }
}

/// RFC 867's UDP form: any datagram gets one datagram with the line (22 bytes).
impl DatagramService for Daytime {
    fn on_datagram(
        &self,
        _request: &[u8],
        _peer: SocketAddr,
        _local: SocketAddr,
        _now: Instant,
        reply: &mut Vec<u8>,
    ) -> super::Answer {
        reply.extend_from_slice(daytime_line(SystemTime::now()).as_bytes());
        super::Answer::Reply
    }
}

/// A session that sends one fixed answer, then closes (daytime, time).
#[derive(Debug)]
pub(super) struct Answer {
    answer: Vec<u8>,
    sent: usize,
}

impl Answer {
    pub(super) fn new(answer: Vec<u8>) -> Self {
        Answer { answer, sent: 0 }
    }
}

impl Session for Answer {
    fn interest(&self) -> Interest {
        if self.sent < self.answer.len() { Interest::WRITE } else { Interest::NONE }
    }

    fn on_readable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let n = write_some(cx, &self.answer[self.sent..])?;
        self.sent += n;
        let done = self.sent == self.answer.len();
        if done {
            cx.close(CloseReason::ServerClose);
        }
        Ok(Progress { bytes_in: 0, bytes_out: n as u64, exchanges: u64::from(done && n > 0) })
    }

    fn is_at_rest(&self) -> bool {
        self.sent == 0 || self.sent == self.answer.len()
    }

    fn is_done(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::services::testing::{Fake, call};

    #[test]
    fn one_rfc_3339_utc_line_then_close() {
        let at = UNIX_EPOCH + Duration::from_secs(1_795_316_645);
        assert_eq!(daytime_line(at), "2026-11-22T03:04:05Z\r\n");
        let mut io = Fake::new(b"", false, 10);
        let mut session = Answer::new(daytime_line(at).into_bytes());
        let (first, close) = call(&mut io, |cx| session.on_writable(cx)).unwrap();
        assert_eq!((first.bytes_out, first.exchanges, close), (10, 0, None), "window of 10");
        io.window = 100;
        let (rest, close) = call(&mut io, |cx| session.on_writable(cx)).unwrap();
        assert_eq!((rest.bytes_out, rest.exchanges), (12, 1));
        assert_eq!(close, Some(CloseReason::ServerClose));
        assert_eq!(io.output, b"2026-11-22T03:04:05Z\r\n");
        assert_eq!(session.interest(), Interest::NONE);
    }
}
