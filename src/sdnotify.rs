//! systemd integration: sd_notify(3) state messages and the watchdog (sd-notify crate).
//!
//! Runs in the master only. Every message is a no-op without `NOTIFY_SOCKET`. `READY=1` is
//! sent once every listener is bound and the first generation's workers are accepting;
//! `RELOADING=1` with `MONOTONIC_USEC` when a reload starts and `READY=1` when it ends
//! (applied, rejected or rolled back), as `Type=notify-reload` expects; `STOPPING=1` on
//! stop; `STATUS=` with a one-line summary. `WATCHDOG=1` goes out every half of
//! `WATCHDOG_USEC`, but only while the pool is healthy, so systemd restarts a wedged daemon.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The master's link to the service manager.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    warned: bool,
    unhealthy: bool,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        Notifier {
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            warned: false,
            unhealthy: false,
        }
    }

    /// The watchdog interval systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        if let Err(error) = sd_notify::notify(states)
            && !self.warned
        {
            log::warn!("could not notify systemd: {error}");
            self.warned = true;
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&mut self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `MAINPID=` (this process) with `READY=1`: the new master of a binary upgrade takes
    /// over as the service's main process (needs `NotifyAccess=all`).
    pub fn ready_as_main(&mut self, status: &str) {
        let pid = std::process::id();
        self.send(&[NotifyState::MainPid(pid), NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC`.
    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// When the next watchdog ping is due, if the watchdog is on. (systemd enforces the
    /// watchdog once the service is ready; the master starts pinging then.)
    pub fn next_ping(&self, now: Instant) -> Option<Instant> {
        let interval = self.watchdog? / 2;
        Some(self.last_ping.map_or(now, |last| last + interval))
    }

    /// Sends `WATCHDOG=1` with a status line if `healthy`; an unhealthy pool gets no ping,
    /// so systemd's watchdog fires. Either way the next check is half an interval away.
    pub fn ping(&mut self, now: Instant, healthy: bool, status: &str) {
        self.last_ping = Some(now);
        if healthy {
            if std::mem::take(&mut self.unhealthy) {
                log::warn!("worker pool healthy again: pinging the systemd watchdog");
            }
            self.send(&[NotifyState::Watchdog, NotifyState::Status(status)]);
        } else if !std::mem::replace(&mut self.unhealthy, true) {
            log::error!(
                "worker pool unhealthy (stale heartbeats): not pinging the systemd watchdog"
            );
        }
    }
}
