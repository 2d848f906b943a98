//! The worker's books: what becomes of every connection's end (an access line, or a refusal
//! counted and summarized), its counters not yet published, and the rate limits of its
//! warnings.
//!
//! Runs in workers. A refusal never gets an access line of its own: it is counted (worker and
//! listener) and summarized per client and reason ([`super::refusals`]), so that the log does
//! not grow with an attack. Everything else that ends gets one access line, when
//! `access_log` is on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::logging::ACCESS_TARGET;
use crate::net::Peer;
use crate::rate::RateLimit;
use crate::scoreboard::TlsFailure;
use crate::services::{CloseReason, Progress};

use super::counters::{Counters, refusal_of};
use super::listeners::Listeners;
use super::refusals::{self, Summaries};

/// Least interval between two log lines about refusals or accept errors.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A connection that ended (or was refused), for its access line or refusal count.
#[derive(Debug, Clone, Copy)]
pub struct Closed<'a> {
    /// Listener index.
    pub listener: usize,
    /// The client (the one a PROXY header named, if any).
    pub peer: Peer,
    /// The proxy it came through, if any.
    pub proxy: Option<SocketAddr>,
    /// Time since accept.
    pub duration: Duration,
    /// Bytes and exchanges.
    pub totals: Progress,
    /// Why it ended.
    pub reason: CloseReason,
    /// The service's own `key=value` fields ([`crate::services::Session::describe`]).
    pub fields: &'a str,
}

impl Closed<'_> {
    /// Whether the client connected and went away, by a FIN or a reset (`client-close` or
    /// `error`), with not a byte moved either way: a load balancer's health check, as
    /// HAProxy's `check` makes one (connect, then RST). Its access line is `reason=empty`
    /// at debug level, not an error at info level once per probe, and it counts as a
    /// client close.
    pub fn is_empty(&self) -> bool {
        self.totals.bytes_in == 0
            && self.totals.bytes_out == 0
            && self.totals.exchanges == 0
            && matches!(self.reason, CloseReason::ClientClose | CloseReason::Error)
    }

    /// Turned away before any exchange.
    pub fn refused(
        listener: usize,
        peer: Peer,
        proxy: Option<SocketAddr>,
        reason: CloseReason,
    ) -> Self {
        Closed {
            listener,
            peer,
            proxy,
            duration: Duration::ZERO,
            totals: Progress::default(),
            reason,
            fields: "",
        }
    }
}

/// The worker's books.
#[derive(Debug)]
pub struct Books {
    /// Worker-wide counts not yet on the scoreboard.
    pub counters: Counters,
    /// Whether access lines are written (`log.access_log`).
    pub access_log: bool,
    /// Refusal summaries per client and reason.
    summaries: Summaries,
    /// Failed TLS handshakes, summarized the same way.
    handshakes: Summaries<TlsFailure>,
    /// Refusals logged one by one (the shared table failing, datagrams over their rate).
    pub refusal_log: RateLimit,
    /// Accept and receive errors.
    pub accept_error_log: RateLimit,
    /// "worker full" warnings.
    pub full_log: RateLimit,
}

impl Books {
    /// Books that write access lines if `access_log`.
    pub fn new(access_log: bool) -> Self {
        Books {
            counters: Counters::default(),
            access_log,
            summaries: Summaries::default(),
            handshakes: Summaries::default(),
            refusal_log: RateLimit::new(LOG_INTERVAL),
            accept_error_log: RateLimit::new(LOG_INTERVAL),
            full_log: RateLimit::new(LOG_INTERVAL),
        }
    }

    /// Accounts for an ended connection: a refusal is counted and summarized, anything else
    /// gets its access line.
    pub fn closed(&mut self, listeners: &mut Listeners, record: Closed<'_>) {
        let entry = &mut listeners[record.listener];
        if let CloseReason::Handshake(failure) = record.reason {
            // Counted by the listener's TLS side; summarized, never an access line each.
            self.counters.touch();
            let key = entry.client_key(&record.peer);
            let now = Instant::now();
            if let Some(line) = self.handshakes.record(record.listener, key, failure, now) {
                log_handshakes(listeners, &line);
            }
            return;
        }
        // A probe that connects and closes is the client's close, not an error.
        entry.tally.ended(if record.is_empty() { CloseReason::ClientClose } else { record.reason });
        self.counters.touch();
        let Some(refusal) = refusal_of(record.reason) else {
            return self.access_line(listeners, &record);
        };
        self.counters.refused(refusal);
        let key = entry.client_key(&record.peer);
        if let Some(line) = self.summaries.record(record.listener, key, refusal, Instant::now()) {
            log_summary(listeners, &line);
        }
    }

    fn access_line(&self, listeners: &Listeners, record: &Closed<'_>) {
        if self.access_log {
            let Closed { listener, peer, proxy, duration, totals, reason, fields } = *record;
            let listener = &listeners[listener].policy.name;
            let via = proxy.map(|p| format!(" proxy={p}")).unwrap_or_default();
            let (level, reason) = match record.is_empty() {
                true => (log::Level::Debug, "empty"),
                false => (log::Level::Info, reason.as_str()),
            };
            log::log!(
                target: ACCESS_TARGET,
                level,
                "access listener={listener} peer={peer} duration={:.3}s in={} out={} exchanges={} reason={reason}{via}{fields}",
                duration.as_secs_f64(),
                totals.bytes_in,
                totals.bytes_out,
                totals.exchanges,
            );
        }
    }

    /// Writes the refusal summaries due at `now` (all of them with `all`).
    pub fn log_summaries(&mut self, listeners: &Listeners, now: Instant, all: bool) {
        for line in self.summaries.flush(now, all) {
            log_summary(listeners, &line);
        }
        for line in self.handshakes.flush(now, all) {
            log_handshakes(listeners, &line);
        }
    }

    /// When the next refusal summary is due.
    #[inline]
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.summaries.next_deadline(), self.handshakes.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn log_handshakes(listeners: &Listeners, line: &refusals::Line<TlsFailure>) {
    let listener = &listeners[line.listener].policy.name;
    let client = line.client.map_or_else(|| "other clients".to_owned(), |c| c.to_string());
    let reason = line.reason.name();
    let interval = refusals::SUMMARY_INTERVAL.as_secs();
    if line.first {
        log::warn!(
            "TLS handshake failed with {client} on {listener} ({reason}); more are counted and logged every {interval}s"
        );
    } else {
        log::warn!(
            "TLS handshakes failed: {} with {client} on {listener} ({reason}) in the last {interval}s",
            line.count
        );
    }
}

fn log_summary(listeners: &Listeners, line: &refusals::Line) {
    let listener = &listeners[line.listener].policy.name;
    let client = line.client.map_or_else(|| "other clients".to_owned(), |c| c.to_string());
    let reason = line.reason.name();
    if line.first {
        log::warn!(
            "refused a connection from {client} on {listener} ({reason}); more are counted and logged every {}s",
            refusals::SUMMARY_INTERVAL.as_secs()
        );
    } else {
        log::warn!(
            "refused {} connections from {client} on {listener} ({reason}) in the last {}s",
            line.count,
            refusals::SUMMARY_INTERVAL.as_secs()
        );
    }
}
