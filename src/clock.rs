//! The clocks that mean the same in every process: `CLOCK_MONOTONIC` for what is shared
//! between processes (rate buckets, heartbeats, backend health), the wall clock for what is
//! shown to people (start times).
//!
//! Runs in every process. `std::time::Instant` reads the same `CLOCK_MONOTONIC` on Linux;
//! it stays the type of a process's own deadlines, and these integers are what goes into
//! shared memory, where an `Instant` cannot.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};

/// `CLOCK_MONOTONIC` in nanoseconds: comparable across processes of one boot; 0 if the
/// clock cannot be read (it always can on Linux).
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// `CLOCK_MONOTONIC` in milliseconds: [`monotonic_ns`] / 1,000,000.
pub fn monotonic_ms() -> u64 {
    monotonic_ns() / 1_000_000
}

/// Wall-clock Unix time in milliseconds; 0 for a clock set before 1970.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_is_one_clock_in_two_units() {
        let (ms, ns) = (monotonic_ms(), monotonic_ns());
        assert!(ns > 0);
        assert!(ns / 1_000_000 >= ms, "{ns} ns read after {ms} ms");
        assert!(ns / 1_000_000 - ms < 1000, "{ns} ns and {ms} ms are one clock");
    }
}
