//! PROXY protocol header parser, versions 1 (text) and 2 (binary), as HAProxy's
//! specification `proxy-protocol.txt` defines them.
//!
//! Pure: no I/O. The worker reads a header from a trusted proxy in steps with this parser
//! (runs in the worker, before the connection's session is made). Invariants the worker's
//! bounded, exact read relies on:
//! - [`parse`] answers [`Parsed::Incomplete`] only when every byte given belongs to the
//!   header (the header is longer), so the caller may consume them all without taking any
//!   byte of the client's own data;
//! - no header is longer than [`MAX_HEADER`]; a longer one is [`HeaderError::TooLong`].
//!
//! A `LOCAL` command (v2) or `UNKNOWN` protocol (v1), as load balancers send for their own
//! health checks, carries no client: [`Parsed::Complete`] with `source: None`, and the
//! connection is the proxy's own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The 12-byte signature that opens a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest version 1 header, CRLF included (the specification's 107 bytes).
pub const MAX_V1: usize = 107;

/// Longest version 2 header accepted: 16 fixed bytes and 1024 of addresses and TLVs (HAProxy,
/// AWS and GCP balancers send far less).
pub const MAX_HEADER: usize = 16 + 1024;

/// What [`parse`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The header goes on beyond the bytes given; all of them are header bytes.
    Incomplete,
    /// A whole header of `len` bytes (the client's data starts after it).
    Complete {
        /// Header length in bytes.
        len: usize,
        /// The client's address and port; `None` for `LOCAL` / `UNKNOWN` (the proxy itself).
        source: Option<SocketAddr>,
    },
}

/// A header that is not valid PROXY protocol.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Neither `PROXY ` nor the version 2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// Longer than [`MAX_V1`] (v1) or [`MAX_HEADER`] (v2).
    #[error("PROXY protocol header too long")]
    TooLong,
    /// A version 1 header that breaks the grammar.
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(&'static str),
    /// A version 2 header with an unknown version, command or address length.
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(&'static str),
}

/// Parses the start of a connection from a trusted proxy.
///
/// # Errors
/// [`HeaderError`] when the bytes cannot begin a valid header; the connection is closed then.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let v1_prefix = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        if n < V2_SIGNATURE.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(v1_prefix.len());
    if buf[..n] == v1_prefix[..n] {
        if n < v1_prefix.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v1(buf);
    }
    Err(HeaderError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        // A lone CR can only be followed by LF; anything after it is an error.
        if let Some(cr) = buf.iter().position(|&b| b == b'\r')
            && cr + 1 < buf.len()
        {
            return Err(HeaderError::V1("CR not followed by LF"));
        }
        return if buf.len() >= MAX_V1 {
            Err(HeaderError::TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = end + 2;
    if len > MAX_V1 {
        return Err(HeaderError::TooLong);
    }
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| HeaderError::V1("not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.first().copied() {
        Some("UNKNOWN") => return Ok(Parsed::Complete { len, source: None }),
        Some("TCP4" | "TCP6") => {}
        _ => return Err(HeaderError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    }
    let [protocol, source, destination, source_port, destination_port] = fields[..] else {
        return Err(HeaderError::V1("expected 5 fields after PROXY"));
    };
    let ip = |text: &str| -> Result<IpAddr, HeaderError> {
        match protocol {
            "TCP4" => text.parse::<Ipv4Addr>().map(IpAddr::V4),
            _ => text.parse::<Ipv6Addr>().map(IpAddr::V6),
        }
        .map_err(|_| HeaderError::V1("address does not match the protocol"))
    };
    let port = |text: &str| -> Result<u16, HeaderError> {
        let valid = !text.is_empty()
            && text.len() <= 5
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        valid.then(|| text.parse().ok()).flatten().ok_or(HeaderError::V1("invalid port"))
    };
    let client = SocketAddr::new(ip(source)?, port(source_port)?);
    ip(destination)?;
    port(destination_port)?;
    Ok(Parsed::Complete { len, source: Some(client) })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < 16 {
        if let Some(&version) = buf.get(12)
            && version >> 4 != 2
        {
            return Err(HeaderError::V2("version is not 2"));
        }
        return Ok(Parsed::Incomplete);
    }
    let (version_command, family) = (buf[12], buf[13]);
    let extra = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + extra;
    if version_command >> 4 != 2 {
        return Err(HeaderError::V2("version is not 2"));
    }
    if len > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    let local = match version_command & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(HeaderError::V2("command is neither LOCAL nor PROXY")),
    };
    // Address sizes by family (high nibble): UNSPEC 0, INET 12, INET6 36, UNIX 216.
    let needed = match family >> 4 {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(HeaderError::V2("unknown address family")),
    };
    if extra < needed {
        return Err(HeaderError::V2("address block shorter than its family needs"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[16..len];
    // Only TCP over IPv4 or IPv6 names a client; LOCAL, UNSPEC, UDP and UNIX are the proxy's.
    let source = match (local, family) {
        (false, 0x11) => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
        }
        (false, 0x21) => {
            let octets: [u8; 16] = a[..16].try_into().expect("36 bytes checked");
            let port = u16::from_be_bytes([a[32], a[33]]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => None,
    };
    Ok(Parsed::Complete { len, source })
}

/// How many of `buf`'s bytes the caller may consume after [`parse`] answered `parsed` for
/// them: all of them while incomplete (they are header bytes), the header's length once
/// complete.
pub fn consumable(buf: &[u8], parsed: &Parsed) -> usize {
    match parsed {
        Parsed::Incomplete => buf.len(),
        Parsed::Complete { len, .. } => *len,
    }
}

/// A version 2 header for `source` -> `destination` (both of one family), for tests and
/// for tools that speak to preforkd through a proxy.
pub fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            header.push(0x11);
            header.extend(12u16.to_be_bytes());
            header.extend(s.ip().octets());
            header.extend(d.ip().octets());
            header.extend(s.port().to_be_bytes());
            header.extend(d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            header.push(0x21);
            header.extend(36u16.to_be_bytes());
            header.extend(v6(s).octets());
            header.extend(v6(d).octets());
            header.extend(s.port().to_be_bytes());
            header.extend(d.port().to_be_bytes());
        }
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET /";
        assert_eq!(
            parse(header),
            Ok(Parsed::Complete { len: 45, source: Some(addr("192.0.2.7:56324")) })
        );
        let header = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 7\r\n";
        assert_eq!(
            parse(header),
            Ok(Parsed::Complete { len: header.len(), source: Some(addr("[2001:db8::7]:65535")) })
        );
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(parse(unknown), Ok(Parsed::Complete { len: 15, source: None }));
        let unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(parse(unknown), Ok(Parsed::Complete { len: unknown.len(), source: None }));
    }

    #[test]
    fn v1_in_pieces_is_incomplete_and_every_piece_is_header() {
        let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n";
        for cut in 0..header.len() {
            let part = &header[..cut];
            let parsed = parse(part).unwrap();
            assert_eq!(parsed, Parsed::Incomplete, "{cut}");
            assert!(consumable(part, &parsed) <= cut);
        }
    }

    #[test]
    fn v1_mistakes_are_rejected() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 0443 443\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 1 443\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 443\r\n",
            b"PROXY TCP4 192.0.2.7\rX",
            b"GET / HTTP/1.0\r\n",
            b"proxy TCP4",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(HeaderError::TooLong));
    }

    #[test]
    fn v2_inet_inet6_and_local() {
        let header = v2_header(addr("192.0.2.7:56324"), addr("198.51.100.1:443"));
        assert_eq!(header.len(), 28);
        assert_eq!(
            parse(&[header.as_slice(), b"data"].concat()),
            Ok(Parsed::Complete { len: 28, source: Some(addr("192.0.2.7:56324")) })
        );
        let header = v2_header(addr("[2001:db8::7]:1"), addr("[2001:db8::1]:2"));
        assert_eq!(
            parse(&header),
            Ok(Parsed::Complete { len: 52, source: Some(addr("[2001:db8::7]:1")) })
        );
        // LOCAL with no address (a health check), and with a TLV after the addresses.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local), Ok(Parsed::Complete { len: 16, source: None }));
        let mut tlv = v2_header(addr("192.0.2.7:1"), addr("198.51.100.1:2"));
        tlv[15] += 7;
        tlv.extend([0x04, 0x00, 0x04, b'a', b'b', b'c', b'd']);
        assert_eq!(
            parse(&tlv),
            Ok(Parsed::Complete { len: 35, source: Some(addr("192.0.2.7:1")) })
        );
        for cut in 0..tlv.len() {
            assert_eq!(parse(&tlv[..cut]), Ok(Parsed::Incomplete), "{cut}");
        }
    }

    #[test]
    fn v2_mistakes_are_rejected() {
        let good = v2_header(addr("192.0.2.7:1"), addr("198.51.100.1:2"));
        let with = |index: usize, value: u8| {
            let mut bad = good.clone();
            bad[index] = value;
            parse(&bad)
        };
        assert!(with(12, 0x11).is_err(), "version 1 in a v2 header");
        assert!(with(12, 0x22).is_err(), "unknown command");
        assert!(with(13, 0x51).is_err(), "unknown family");
        assert!(with(15, 4).is_err(), "address block too short for INET");
        let mut huge = good.clone();
        huge[14] = 0xff;
        assert_eq!(parse(&huge), Err(HeaderError::TooLong));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX\n"), Err(HeaderError::NotProxy));
    }
}
