//! Durations as the configuration writes them: humane strings such as `"250ms"`, `"10s"`,
//! `"5m"` or `"1h"` (the `humantime` grammar), at most [`MAX_DURATION`].
//!
//! Pure; used by the configuration check, by services reading their options and by the
//! period of a [`crate::rate::Rate`], so that every duration in the file reads alike and
//! every problem is worded alike.

use std::time::Duration;

/// Longest duration any key accepts (365 days): deadlines stay far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a humane duration (surrounding blanks ignored), at most [`MAX_DURATION`].
///
/// # Errors
/// The message to report, naming the text: not a duration (with how to write one), or
/// longer than 365 days.
pub fn parse(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(duration) if duration > MAX_DURATION => {
            Err(format!("{text:?} is too long: at most 365 days"))
        }
        Ok(duration) => Ok(duration),
        Err(error) => Err(format!(
            "invalid duration {text:?} ({error}); write a number with a unit, such as \"10s\", \"250ms\" or \"5m\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_units_and_a_ceiling() {
        assert_eq!(parse(" 250ms "), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("365days"), Ok(MAX_DURATION));
        assert!(parse("366days").unwrap_err().contains("too long"));
        assert!(parse("10").unwrap_err().starts_with("invalid duration \"10\""));
        assert!(parse("soon").unwrap_err().contains("write a number with a unit"));
    }
}
