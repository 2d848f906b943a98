//! [`Frame`]: what a decoder finds at the start of a connection's buffered input, and the
//! decoders preforkd provides: [`lines`], [`u16_prefixed`] and [`u32_prefixed`].
//!
//! Runs in workers (called by [`super::Framed`] after every read). A decoder is a pure
//! function of the bytes buffered so far: it says where the first frame ends, and which part
//! of it the handler gets, without copying or keeping anything. It is called again, on the
//! same bytes and more, until it finds a frame, so it must be cheap on a short prefix and
//! give the same answer for the same bytes. Its contract, for input `b`:
//! - [`Frame::Complete`]: `len >= 1`, `len <= b.len()`, and `payload` lies within `..len`;
//!   [`super::Framed`] treats anything else as a decoder bug and closes the connection
//!   (`bad-frame`), never panicking;
//! - [`Frame::Incomplete`] and [`Frame::Needs`]: no frame yet, whatever `b` holds beyond
//!   what was looked at; the helper enforces its size limit on them;
//! - [`Frame::Invalid`]: no amount of further input makes `b` a frame.
//!
//! tokio-util's `Decoder` returns the decoded item and consumes the buffer itself; here the
//! decoder only measures, and the handler parses the frame it is given. That keeps the
//! decoder a plain `fn`, with no state to hand off, and lets the helper own the buffer.

use std::ops::Range;

/// What the start of the buffered input holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole frame yet, of a length not known yet (a line without its LF).
    Incomplete,
    /// Not a whole frame yet; it will be at least this many bytes in all (a length-prefixed
    /// frame whose header has arrived, or the part of a frame whose lengths are known so
    /// far): the helper refuses it at once if that is over its limit, and makes room for it.
    Needs(usize),
    /// A whole frame: the first `len` bytes of the input. The handler gets the bytes in
    /// `payload` (the frame without its header or delimiter), and the helper drops all `len`
    /// once the handler returns.
    Complete {
        /// The frame's length, header and delimiter included.
        len: usize,
        /// What the handler gets, within `0..len`.
        payload: Range<usize>,
    },
    /// The input can never become a frame: the connection closes with this reason in the
    /// access log (lowercase words joined by `-`, as `bad-length`), after what was answered
    /// before it is sent.
    Invalid(&'static str),
}

impl Frame {
    /// A whole frame of `len` bytes, all of which the handler gets.
    pub fn whole(len: usize) -> Frame {
        Frame::Complete { len, payload: 0..len }
    }
}

/// Finds the first frame in the buffered input. Its contract, for input `b`:
/// [`Frame::Complete`] has `len >= 1`, `len <= b.len()` and `payload` within `..len` (anything
/// else closes the connection as `bad-frame`); [`Frame::Incomplete`] and [`Frame::Needs`] say
/// no frame yet; [`Frame::Invalid`] says no more input can make one. It is called again on
/// the same bytes and more until it finds a frame, so it must be cheap on a short prefix and
/// keep no state.
pub type Decoder = fn(&[u8]) -> Frame;

/// Lines ended by LF, as most text protocols send them (SMTP, POP3, memcache, Redis inline
/// commands): the handler gets the line without its LF and without a CR before it. Any byte
/// is allowed in a line. A last line that the client ends with its FIN instead of an LF is
/// not a frame: it goes to [`super::FrameHandler::on_end`].
pub fn lines(input: &[u8]) -> Frame {
    let Some(lf) = input.iter().position(|&b| b == b'\n') else { return Frame::Incomplete };
    let end = if lf > 0 && input[lf - 1] == b'\r' { lf - 1 } else { lf };
    Frame::Complete { len: lf + 1, payload: 0..end }
}

/// Frames of a 2-byte big-endian (network order) payload length, then the payload: the
/// handler gets the payload. A length of 0 is an empty frame.
pub fn u16_prefixed(input: &[u8]) -> Frame {
    prefixed::<2>(input)
}

/// Frames of a 4-byte big-endian (network order) payload length, then the payload, as
/// tokio-util's `LengthDelimitedCodec` does by default: the handler gets the payload. A
/// length over the helper's `max_frame` is refused as soon as the header has arrived.
pub fn u32_prefixed(input: &[u8]) -> Frame {
    prefixed::<4>(input)
}

/// A big-endian length of `N` bytes (at most 8), then that many bytes.
fn prefixed<const N: usize>(input: &[u8]) -> Frame {
    let Some(header) = input.get(..N) else { return Frame::Incomplete };
    let length = header.iter().fold(0u64, |length, &byte| length << 8 | u64::from(byte));
    let Some(len) = usize::try_from(length).ok().and_then(|length| length.checked_add(N)) else {
        return Frame::Invalid("bad-length");
    };
    if input.len() < len {
        return Frame::Needs(len);
    }
    Frame::Complete { len, payload: N..len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_ends_at_its_lf_and_loses_a_cr_before_it() {
        assert_eq!(lines(b"abc"), Frame::Incomplete);
        assert_eq!(lines(b"abc\r"), Frame::Incomplete);
        assert_eq!(lines(b"abc\r\nde\n"), Frame::Complete { len: 5, payload: 0..3 });
        assert_eq!(lines(b"abc\nde\n"), Frame::Complete { len: 4, payload: 0..3 });
        assert_eq!(lines(b"\n"), Frame::Complete { len: 1, payload: 0..0 });
        assert_eq!(lines(b"\r\n"), Frame::Complete { len: 2, payload: 0..0 });
        assert_eq!(lines(b"a\rb\n"), Frame::Complete { len: 4, payload: 0..3 }, "inner CR kept");
    }

    #[test]
    fn a_length_prefixed_frame_needs_its_header_then_its_payload() {
        assert_eq!(u16_prefixed(b""), Frame::Incomplete);
        assert_eq!(u16_prefixed(b"\x00"), Frame::Incomplete);
        assert_eq!(u16_prefixed(b"\x00\x03ab"), Frame::Needs(5));
        assert_eq!(u16_prefixed(b"\x00\x03abcX"), Frame::Complete { len: 5, payload: 2..5 });
        assert_eq!(u16_prefixed(b"\x00\x00"), Frame::Complete { len: 2, payload: 2..2 });
        assert_eq!(u16_prefixed(b"\x01\x00"), Frame::Needs(258), "big-endian");
        assert_eq!(u32_prefixed(b"\x00\x00\x00"), Frame::Incomplete);
        assert_eq!(u32_prefixed(b"\xff\xff\xff\xff"), Frame::Needs(0xffff_ffff + 4));
        assert_eq!(u32_prefixed(b"\x00\x00\x00\x01z"), Frame::Complete { len: 5, payload: 4..5 });
        assert_eq!(Frame::whole(3), Frame::Complete { len: 3, payload: 0..3 });
    }
}
