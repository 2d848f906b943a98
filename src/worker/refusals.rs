//! Refusal summaries: the log says how many connections a client had refused, not one line
//! per connection, so the log's size does not grow with an attack.
//!
//! Pure (time is passed in), owned by one worker. For each (listener, client, reason):
//! - the first refusal is logged at once, and opens a window of [`SUMMARY_INTERVAL`];
//! - later refusals in the window are only counted; when the window ends, one line gives the
//!   count, and a new window opens if there was any (else the client is forgotten).
//!
//! So each client and reason costs at most one line per interval. At most [`MAX_CLIENTS`]
//! clients are tracked at once; beyond that, refusals are counted per listener and reason as
//! "other clients", so memory is bounded too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::limits::ClientKey;
use crate::scoreboard::Refusal;

/// Length of a summary window.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Clients tracked at once per worker.
pub const MAX_CLIENTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Subject<R> {
    listener: usize,
    /// `None`: every client beyond [`MAX_CLIENTS`].
    client: Option<ClientKey>,
    reason: R,
}

#[derive(Debug)]
struct Window {
    ends: Instant,
    /// Refusals in the window not logged yet.
    count: u64,
}

/// The per-worker summary table, of refusals by [`Refusal`] (or of other outcomes a client
/// causes by the thousand, such as failed TLS handshakes, by their own reason type `R`).
#[derive(Debug)]
pub struct Summaries<R = Refusal> {
    windows: HashMap<Subject<R>, Window>,
}

impl<R> Default for Summaries<R> {
    fn default() -> Self {
        Summaries { windows: HashMap::new() }
    }
}

/// One log line to write: the listener's index, the client and reason, and how many
/// refusals it reports (1 for the first of a window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<R = Refusal> {
    /// Listener index in the configuration.
    pub listener: usize,
    /// The client (as keyed by prefix); `None` for "other clients".
    pub client: Option<ClientKey>,
    /// Why.
    pub reason: R,
    /// Refusals this line reports.
    pub count: u64,
    /// Whether this is the first refusal of a window (else a summary of `count`).
    pub first: bool,
}

impl<R: Copy + Eq + std::hash::Hash> Summaries<R> {
    /// Counts one refusal at `now`; returns the line to log at once, if any.
    pub fn record(
        &mut self,
        listener: usize,
        client: ClientKey,
        reason: R,
        now: Instant,
    ) -> Option<Line<R>> {
        let mut subject = Subject { listener, client: Some(client), reason };
        if !self.windows.contains_key(&subject) && self.windows.len() >= MAX_CLIENTS {
            subject.client = None;
        }
        match self.windows.get_mut(&subject) {
            Some(window) => {
                window.count += 1;
                None
            }
            None => {
                self.windows.insert(subject, Window { ends: now + SUMMARY_INTERVAL, count: 0 });
                Some(Line { listener, client: subject.client, reason, count: 1, first: true })
            }
        }
    }

    /// The summaries of every window ended by `now` (all of them with `all`, at exit).
    pub fn flush(&mut self, now: Instant, all: bool) -> Vec<Line<R>> {
        let mut lines = Vec::new();
        self.windows.retain(|subject, window| {
            if !all && window.ends > now {
                return true;
            }
            if window.count == 0 {
                return false;
            }
            lines.push(Line {
                listener: subject.listener,
                client: subject.client,
                reason: subject.reason,
                count: std::mem::take(&mut window.count),
                first: false,
            });
            window.ends = now + SUMMARY_INTERVAL;
            !all
        });
        lines
    }

    /// When the next window ends. Asked every turn of the loop: nothing to go through
    /// while no client is refused.
    #[inline]
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.windows.is_empty() {
            return None;
        }
        self.windows.values().map(|w| w.ends).min()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::new(0, IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    #[test]
    fn one_line_per_client_and_reason_per_interval() {
        let mut s: Summaries = Summaries::default();
        let t0 = Instant::now();
        let first = s.record(0, client(1), Refusal::Limit, t0).unwrap();
        assert!(first.first && first.count == 1);
        for _ in 0..9_999 {
            assert_eq!(s.record(0, client(1), Refusal::Limit, t0), None);
        }
        // Another reason and another client have their own windows.
        assert!(s.record(0, client(1), Refusal::Rate, t0).is_some());
        assert!(s.record(0, client(2), Refusal::Limit, t0).is_some());
        assert!(s.flush(t0 + Duration::from_secs(1), false).is_empty());
        assert_eq!(s.next_deadline(), Some(t0 + SUMMARY_INTERVAL));
        let lines = s.flush(t0 + SUMMARY_INTERVAL, false);
        assert_eq!(lines.len(), 1, "only the window with refusals left: {lines:?}");
        assert_eq!((lines[0].count, lines[0].first), (9_999, false));
        // Quiet windows are forgotten; the active one goes on.
        assert_eq!(s.windows.len(), 1);
        let t1 = t0 + SUMMARY_INTERVAL;
        assert_eq!(s.record(0, client(1), Refusal::Limit, t1), None);
        assert_eq!(s.flush(t1, true)[0].count, 1);
        assert!(s.windows.is_empty());
    }

    #[test]
    fn memory_is_bounded_by_lumping_other_clients() {
        let mut s: Summaries = Summaries::default();
        let t0 = Instant::now();
        for n in 0..(MAX_CLIENTS as u32 + 500) {
            let key = ClientKey::new(0, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
            s.record(0, key, Refusal::Denied, t0);
        }
        assert_eq!(s.windows.len(), MAX_CLIENTS + 1);
        let lines = s.flush(t0 + SUMMARY_INTERVAL, false);
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].client, lines[0].count), (None, 499));
    }
}
