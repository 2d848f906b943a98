//! Metrics: the daemon's scoreboard for Prometheus, over HTTP/1.1 (RFC 9110, RFC 9112):
//! `GET /metrics` answers the Prometheus text format 0.0.4, or OpenMetrics 1.0.0 text when
//! the `Accept` field prefers it (as Prometheus's own scraper does).
//!
//! Runs in workers. One request per connection, then the server closes (`Connection:
//! close`): a scraper opens one connection per scrape. The request head is bounded
//! ([`http::MAX_REQUEST`]) and must come whole within `request_timeout` of its first byte
//! (408 then); a client that sends nothing is closed by the listener's idle timeout. Another
//! path gets 404, another method 405, anything not HTTP/1.x 400. The values come from the
//! scoreboard the worker passes in its [`Context::scoreboard`], read at the moment the
//! request is complete; the metrics and their labels are listed in preforkd.toml(5). The
//! scoreboard tells everything about the daemon's traffic: bind the listener to loopback,
//! or guard it with `allow`.

mod exposition;
mod http;

use std::io::{self, ErrorKind};
use std::sync::Arc;
use std::time::Duration;

use exposition::{OPENMETRICS, TEXT_004, render};
use http::{MAX_REQUEST, Request};

use super::{
    CloseReason, ConnInfo, Context, Interest, Invalid, Options, Progress, Service, Session,
    write_some,
};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "metrics";

/// Default `request_timeout`.
pub(super) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsOptions {
    request_timeout: Option<String>,
}

/// Builds the service from its options (`request_timeout`).
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    let written: MetricsOptions = options.parse()?;
    let request_timeout = options.duration(
        "request_timeout",
        written.request_timeout.as_deref(),
        DEFAULT_REQUEST_TIMEOUT,
    );
    if request_timeout.is_zero() {
        options.report("request_timeout", "must be more than 0");
    }
    options.finish(Arc::new(Metrics { request_timeout }) as Arc<dyn Service>)
}

/// The metrics service: the scoreboard as Prometheus metrics.
#[derive(Debug, Clone, Copy)]
pub struct Metrics {
    /// Longest time from the first byte of a request to the end of its head; then 408.
    /// Default 5 s (`request_timeout` in `[listener.options]`); never 0.
    pub request_timeout: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { request_timeout: DEFAULT_REQUEST_TIMEOUT }
    }
}

impl Service for Metrics {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(MetricsSession {
            request_timeout: self.request_timeout,
            input: Vec::new(),
            answer: None,
            sent: 0,
            timer_set: false,
            peer_closed: false,
        })
    }
}

/// One scrape: read the head, answer, close.
struct MetricsSession {
    request_timeout: Duration,
    /// The request head so far (at most [`MAX_REQUEST`] bytes).
    input: Vec<u8>,
    /// The answer, once the head is complete (or hopeless, or late).
    answer: Option<Vec<u8>>,
    sent: usize,
    timer_set: bool,
    peer_closed: bool,
}

impl MetricsSession {
    fn respond(&mut self, request: Request, cx: &mut Context<'_>) {
        self.answer = Some(match request {
            Request::Metrics { head, openmetrics } => match cx.scoreboard() {
                Some(board) => {
                    let body = render(board, openmetrics);
                    let kind = if openmetrics { OPENMETRICS } else { TEXT_004 };
                    http::answer("200 OK", kind, "", body.as_bytes(), !head)
                }
                None => {
                    let body = b"503 Service Unavailable: no scoreboard\n";
                    let kind = "text/plain; charset=utf-8";
                    http::answer("503 Service Unavailable", kind, "", body, !head)
                }
            },
            other => http::error(other),
        });
        self.input = Vec::new();
        cx.set_timer(None);
    }

    fn flush(&mut self, cx: &mut Context<'_>, progress: &mut Progress) -> io::Result<()> {
        let Some(answer) = &self.answer else { return Ok(()) };
        let n = write_some(cx, &answer[self.sent..])?;
        self.sent += n;
        progress.bytes_out += n as u64;
        if self.sent == answer.len() {
            progress.exchanges += 1;
            cx.close(CloseReason::ServerClose);
        }
        Ok(())
    }
}

impl Session for MetricsSession {
    fn interest(&self) -> Interest {
        match &self.answer {
            Some(answer) if self.sent < answer.len() => Interest::WRITE,
            Some(_) => Interest::NONE,
            None if self.peer_closed => Interest::NONE,
            None => Interest::READ,
        }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        if self.answer.is_some() {
            return Ok(progress);
        }
        let mut chunk = [0u8; 4096];
        loop {
            let room = MAX_REQUEST - self.input.len();
            match cx.io().read(&mut chunk[..room.min(4096)]) {
                Ok(0) => {
                    self.peer_closed = true;
                    if !self.input.is_empty() {
                        // The client ended its side in the middle of a request head.
                        self.respond(Request::Malformed, cx);
                    }
                    break;
                }
                Ok(n) => {
                    progress.bytes_in += n as u64;
                    self.input.extend_from_slice(&chunk[..n]);
                    if !self.timer_set {
                        self.timer_set = true;
                        cx.set_timer(Some(cx.now() + self.request_timeout));
                    }
                    if let Some(request) = http::parse(&self.input) {
                        self.respond(request, cx);
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.flush(cx, &mut progress)?;
        Ok(progress)
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        self.flush(cx, &mut progress)?;
        Ok(progress)
    }

    fn on_timer(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let mut progress = Progress::default();
        if self.answer.is_none() {
            let body = b"408 Request Timeout\n";
            let kind = "text/plain; charset=utf-8";
            self.answer = Some(http::answer("408 Request Timeout", kind, "", body, true));
            self.flush(cx, &mut progress)?;
        }
        Ok(progress)
    }

    fn is_at_rest(&self) -> bool {
        match &self.answer {
            Some(answer) => self.sent == answer.len(),
            None => self.input.is_empty(),
        }
    }

    fn is_done(&self) -> bool {
        self.peer_closed && self.answer.as_ref().is_none_or(|a| self.sent == a.len())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::scoreboard::Scoreboard;
    use crate::services::testing::Fake;

    fn fresh() -> MetricsSession {
        MetricsSession {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            input: Vec::new(),
            answer: None,
            sent: 0,
            timer_set: false,
            peer_closed: false,
        }
    }

    /// Runs `on_readable` over `io` with `board`; returns the progress and the close asked.
    fn read(
        session: &mut MetricsSession,
        io: &mut Fake,
        board: Option<&Scoreboard>,
    ) -> (Progress, Option<CloseReason>) {
        let mut cx = Context::new(io, Instant::now());
        if let Some(board) = board {
            cx = cx.with_scoreboard(board);
        }
        let progress = session.on_readable(&mut cx).unwrap();
        (progress, cx.close.map(|(reason, _)| reason))
    }

    #[test]
    fn a_scrape_in_two_pieces_gets_the_metrics_then_the_server_closes() {
        let board = Scoreboard::create(None, 1).unwrap();
        let mut session = fresh();
        let mut io = Fake::new(b"GET /metrics HTTP/1.1\r\nHo", false, usize::MAX);
        let (progress, close) = read(&mut session, &mut io, Some(&board));
        assert_eq!((progress.exchanges, close, io.output.len()), (0, None, 0));
        assert!(!session.is_at_rest(), "half a request is in flight");
        io.input.extend(b"st: x\r\n\r\n");
        let (progress, close) = read(&mut session, &mut io, Some(&board));
        assert_eq!((progress.exchanges, close), (1, Some(CloseReason::ServerClose)));
        let text = String::from_utf8(io.output).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(&format!("Content-Type: {TEXT_004}\r\n")), "{text}");
        assert!(text.contains("\npreforkd_generation 0\n"), "{text}");
    }

    #[test]
    fn garbage_is_answered_400_and_a_late_head_408() {
        let mut session = fresh();
        let mut io = Fake::new(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", false, usize::MAX);
        let (_, close) = read(&mut session, &mut io, None);
        assert_eq!(close, Some(CloseReason::ServerClose));
        assert!(io.output.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        let mut session = fresh();
        let mut io = Fake::new(b"GET /metr", false, usize::MAX);
        read(&mut session, &mut io, None);
        let mut cx = Context::new(&mut io, Instant::now());
        session.on_timer(&mut cx).unwrap();
        assert_eq!(cx.close.map(|(r, _)| r), Some(CloseReason::ServerClose));
        assert!(io.output.starts_with(b"HTTP/1.1 408 Request Timeout\r\n"));
    }

    #[test]
    fn no_scoreboard_is_503_and_eof_before_a_request_is_a_client_close() {
        let mut session = fresh();
        let mut io = Fake::new(b"GET /metrics HTTP/1.0\r\n\r\n", false, usize::MAX);
        read(&mut session, &mut io, None);
        assert!(io.output.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"));
        let mut session = fresh();
        let mut io = Fake::new(b"", true, usize::MAX);
        read(&mut session, &mut io, None);
        assert!(session.is_done() && io.output.is_empty());
    }
}
