//! Rates: "COUNT per PERIOD", written one way for every key that takes one
//! (`max_connection_rate_per_client`, `max_datagram_rate_per_client`), and enforced by one
//! token bucket ([`TokenBucket`]); and [`RateLimit`], which holds back repeated log lines.
//!
//! Pure. Runs wherever a rate is read (the master's configuration check) or enforced (the
//! workers, through the shared tables of [`crate::limits`]).

mod bucket;
mod limit;

use std::num::NonZeroU32;
use std::time::Duration;

pub use bucket::TokenBucket;
pub use limit::RateLimit;

use crate::duration;

/// A rate: `count` per `period`, in bursts of at most `burst` (the size of the bucket).
///
/// Written `"COUNT/PERIOD"` ([`Rate::parse`]); the burst is then the count, unless a key of
/// its own says otherwise (`connection_rate_burst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens gained per period; at least 1.
    pub count: NonZeroU32,
    /// The period: from 1 ms to 365 days.
    pub period: Duration,
    /// Tokens a bucket holds at most: what a client that has been quiet may spend at once.
    pub burst: NonZeroU32,
}

impl Rate {
    /// `count` per `period`, with a burst of `count`.
    pub const fn per(count: NonZeroU32, period: Duration) -> Rate {
        Rate { count, period, burst: count }
    }

    /// Parses `"COUNT/PERIOD"`: COUNT an integer, PERIOD a humane duration (`"10s"`,
    /// `"250ms"`) or a bare unit meaning one of it (`s`, `m` or `min`, `h`, `d` ...), blanks
    /// around either ignored: `"100/s"`, `"600/min"`, `"20/10s"`, `" 5 / m "`. `Ok(None)`, no
    /// limit, for `"0"` and for a count of 0 (`"0/s"`).
    ///
    /// # Errors
    /// What is wrong, to follow `invalid rate "TEXT": `: no `/`, a count that is not an
    /// integer, a period that is not a duration or is outside 1 ms to 365 days.
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(None);
        }
        let Some((count, period)) = text.split_once('/') else {
            return Err(
                "write COUNT/PERIOD, such as \"100/s\", \"600/min\" or \"20/10s\", or \"0\" for no limit"
                    .into(),
            );
        };
        let count: u32 = count.trim().parse().map_err(|_| format!("{count:?} is not a count"))?;
        let period = period.trim();
        let starts_with_digit = period.starts_with(|c: char| c.is_ascii_digit());
        let spelled = if starts_with_digit { period.to_owned() } else { format!("1{period}") };
        let period = humantime::parse_duration(&spelled)
            .map_err(|e| format!("{period:?} is not a period ({e})"))?;
        if period < Duration::from_millis(1) || period > duration::MAX_DURATION {
            return Err("the period must be from 1ms to 365 days".into());
        }
        Ok(NonZeroU32::new(count).map(|count| Rate::per(count, period)))
    }

    /// This rate with bursts of `burst` tokens.
    pub const fn with_burst(self, burst: NonZeroU32) -> Rate {
        Rate { burst, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per(count: u32, secs: u64) -> Result<Option<Rate>, String> {
        Ok(Some(Rate::per(NonZeroU32::new(count).unwrap(), Duration::from_secs(secs))))
    }

    #[test]
    fn rates_are_a_count_per_humane_period() {
        assert_eq!(Rate::parse("100/s"), per(100, 1));
        assert_eq!(Rate::parse("20/s"), per(20, 1));
        assert_eq!(Rate::parse("600/min"), per(600, 60));
        assert_eq!(Rate::parse(" 5 / m "), per(5, 60));
        assert_eq!(Rate::parse("1/h"), per(1, 3600));
        assert_eq!(Rate::parse("1000/h"), per(1000, 3600));
        assert_eq!(Rate::parse("20/10s"), per(20, 10));
        assert_eq!(Rate::parse("20/d"), per(20, 86_400));
        assert_eq!(
            Rate::parse("3/250ms"),
            Ok(Some(Rate::per(NonZeroU32::new(3).unwrap(), Duration::from_millis(250))))
        );
    }

    #[test]
    fn zero_is_no_limit() {
        assert_eq!(Rate::parse("0"), Ok(None));
        assert_eq!(Rate::parse(" 0 "), Ok(None));
        assert_eq!(Rate::parse("0/s"), Ok(None));
    }

    #[test]
    fn every_mistake_is_named() {
        for bad in ["100", "20", "x/s", "-1/s", "5/fortnight", "5/0s", "5/500us", "5/366d"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert!(Rate::parse("100").unwrap_err().contains("write COUNT/PERIOD"));
        assert!(Rate::parse("x/s").unwrap_err().contains("\"x\" is not a count"));
        assert!(Rate::parse("5/fortnight").unwrap_err().contains("is not a period"));
        assert!(Rate::parse("5/0s").unwrap_err().contains("from 1ms to 365 days"));
    }

    #[test]
    fn a_burst_is_the_count_unless_set() {
        let rate = Rate::parse("20/s").unwrap().unwrap();
        assert_eq!(rate.burst.get(), 20);
        assert_eq!(rate.with_burst(NonZeroU32::new(40).unwrap()).burst.get(), 40);
    }
}
