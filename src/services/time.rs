//! Time, RFC 868: four bytes, the seconds since 1900-01-01 00:00 UTC as a 32-bit big-endian
//! number, then the server closes.
//!
//! The 32-bit count wraps on 2036-02-07 06:28:16 UTC: from then on the value is the seconds
//! since that instant (modulo 2^32, era 1 in NTP's terms, RFC 5905), which is what clients
//! that handle the wrap expect (they take small values as era 1). Sent at once on accept;
//! input is thrown away. One exchange. No options.
//!
//! Over UDP (RFC 868's second form), any datagram is answered with the 4 bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::daytime::Answer;
use super::{ConnInfo, DatagramService, Invalid, Options, Service, Session};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "time";

/// Seconds from 1900-01-01 to 1970-01-01 (RFC 868).
pub const SECONDS_1900_TO_1970: u64 = 2_208_988_800;

/// Builds the service; time takes no options.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    options.expect_none(NAME)?;
    Ok(Arc::new(Time))
}

/// The time service (RFC 868).
#[derive(Debug, Default, Clone, Copy)]
pub struct Time;

/// RFC 868's value for `now`: seconds since 1900 modulo 2^32 (before 1970, 0).
pub fn rfc868_seconds(now: SystemTime) -> u32 {
    let unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (unix + SECONDS_1900_TO_1970) as u32
}

impl Service for Time {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(Answer::new(rfc868_seconds(SystemTime::now()).to_be_bytes().to_vec()))
    }

    fn datagram(&self) -> Result<&dyn DatagramService, &'static str> {
        Ok(self)
    }
}

/// RFC 868's UDP form: any datagram (the RFC says an empty one) gets the 4 bytes.
impl DatagramService for Time {
    fn on_datagram(
        &self,
        _request: &[u8],
        _peer: SocketAddr,
        _local: SocketAddr,
        _now: Instant,
        reply: &mut Vec<u8>,
    ) -> super::Answer {
        reply.extend_from_slice(&rfc868_seconds(SystemTime::now()).to_be_bytes());
        super::Answer::Reply
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn seconds_since_1900_wrap_in_2036() {
        assert_eq!(rfc868_seconds(UNIX_EPOCH), 2_208_988_800);
        // 2026-11-22T03:04:05Z
        let now = UNIX_EPOCH + Duration::from_secs(1_795_316_645);
        assert_eq!(rfc868_seconds(now), 4_004_305_445);
        // 2036-02-07T06:28:15Z is the last second of era 0; the next one is 0 of era 1.
        let last = UNIX_EPOCH + Duration::from_secs((1u64 << 32) - SECONDS_1900_TO_1970 - 1);
        assert_eq!(rfc868_seconds(last), u32::MAX);
        assert_eq!(rfc868_seconds(last + Duration::from_secs(1)), 0);
        assert_eq!(rfc868_seconds(last + Duration::from_secs(61)), 60);
        assert_eq!(humantime::format_rfc3339_seconds(last).to_string(), "2036-02-07T06:28:15Z");
    }
}
