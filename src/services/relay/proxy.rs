//! PROXY protocol headers, versions 1 (text) and 2 (binary), as HAProxy's specification
//! (`doc/proxy-protocol.txt`, "The PROXY protocol") defines them: the first bytes a relay sends
//! to its backend, carrying the client's address and the address it connected to.
//!
//! Pure functions, no I/O.

use std::net::{IpAddr, SocketAddr};

use crate::net::Peer;

/// Which PROXY protocol header the relay sends (`send_proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// Version 1: one text line, `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// Version 2: a 16-byte binary preamble and the addresses.
    V2,
}

/// The 12-byte signature that opens a version 2 header (section 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` to `local` (`None` when the local address is
/// unknown: v1 then says `UNKNOWN`, v2 sends the `PROXY` command with `AF_UNSPEC`, which the
/// specification tells the receiver to treat as "use the real connection's addresses").
///
/// A Unix client gets the same: the specification's v1 `UNKNOWN` ("for other protocols")
/// and v2 `AF_UNSPEC` ("when dealing with unsupported protocol families"), still with the
/// `PROXY` command, as the connection is relayed for a client (`LOCAL` is for connections the
/// proxy makes on its own, [`local`]). Its `AF_UNIX` family would carry two 108-byte paths,
/// of which a client's is nearly always empty: it would tell the backend nothing.
///
/// An IPv4 client on an IPv6 socket (`::ffff:a.b.c.d` on both ends) is written as TCP4, as
/// the client really is one; a mix of families that cannot be unified is `UNKNOWN`.
pub fn header(version: Version, client: Peer, local: Option<SocketAddr>) -> Vec<u8> {
    let pair = local.zip(client.socket_addr()).and_then(|(local, client)| same_family(client, local));
    match version {
        Version::V1 => v1(pair),
        Version::V2 => v2(pair),
    }
}

/// Both addresses in one family (IPv4-mapped IPv6 addresses made IPv4 when both are).
fn same_family(a: SocketAddr, b: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
    let canonical = |address: SocketAddr| match address.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), address.port()),
            None => address,
        },
        IpAddr::V4(_) => address,
    };
    let (ca, cb) = (canonical(a), canonical(b));
    if ca.is_ipv4() == cb.is_ipv4() {
        Some((ca, cb))
    } else if a.is_ipv4() == b.is_ipv4() {
        Some((a, b))
    } else {
        None
    }
}

/// The header of a connection the proxy makes on its own, not for a client (a health check
/// of a backend that expects the PROXY protocol): v2's `LOCAL` command (`AF_UNSPEC`, no
/// address), which the receiver must accept and answer as a direct connection; v1 has no
/// such command, and says `UNKNOWN`.
pub fn local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => v1(None),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            // Version 2, command LOCAL; AF_UNSPEC; no address block.
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            out
        }
    }
}

fn v1(pair: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    match pair {
        Some((client, local)) => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        None => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

fn v2(pair: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    // Version 2, command PROXY.
    out.push(0x21);
    match pair {
        Some((client, local)) => {
            let (family, addresses): (u8, Vec<u8>) = match (client.ip(), local.ip()) {
                (IpAddr::V4(c), IpAddr::V4(l)) => (0x11, [c.octets(), l.octets()].concat()),
                (IpAddr::V6(c), IpAddr::V6(l)) => (0x21, [c.octets(), l.octets()].concat()),
                _ => unreachable!("same_family returns one family"),
            };
            // AF_INET or AF_INET6, over STREAM.
            out.push(family);
            let length = addresses.len() + 4;
            out.extend_from_slice(&(length as u16).to_be_bytes());
            out.extend_from_slice(&addresses);
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
        }
        None => {
            // AF_UNSPEC, no address block.
            out.push(0x00);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_for_ipv4_and_ipv6() {
        let client: SocketAddr = "192.0.2.7:56324".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:443".parse().unwrap();
        assert_eq!(
            header(Version::V1, Peer::Ip(client), Some(local)),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"
        );
        let client: SocketAddr = "[2001:db8::1]:1000".parse().unwrap();
        let local: SocketAddr = "[::1]:25".parse().unwrap();
        assert_eq!(
            header(Version::V1, Peer::Ip(client), Some(local)),
            b"PROXY TCP6 2001:db8::1 ::1 1000 25\r\n"
        );
        assert_eq!(header(Version::V1, Peer::Ip(client), None), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn version_2_for_ipv4_and_ipv6() {
        let client: SocketAddr = "10.0.0.1:258".parse().unwrap();
        let local: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend([0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 1, 2, 0, 80]);
        assert_eq!(header(Version::V2, Peer::Ip(client), Some(local)), expected);

        let client: SocketAddr = "[::1]:1".parse().unwrap();
        let local: SocketAddr = "[::2]:2".parse().unwrap();
        let v2 = header(Version::V2, Peer::Ip(client), Some(local));
        assert_eq!(v2.len(), 16 + 36);
        assert_eq!(&v2[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(v2[16 + 15], 1);
        assert_eq!(v2[32 + 15], 2);
        assert_eq!(&v2[48..], &[0, 1, 0, 2]);
        assert_eq!(&header(Version::V2, Peer::Ip(client), None)[12..], &[0x21, 0x00, 0, 0]);
    }

    #[test]
    fn a_unix_client_is_unknown() {
        let unix = Peer::Unix(crate::net::Credentials { pid: 1, uid: 1000, gid: 1000 });
        let to: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(header(Version::V1, unix, Some(to)), b"PROXY UNKNOWN\r\n");
        assert_eq!(&header(Version::V2, unix, None)[12..], &[0x21, 0x00, 0, 0], "PROXY, UNSPEC");
        assert_eq!(&local(Version::V2)[..12], &V2_SIGNATURE);
        assert_eq!(&local(Version::V2)[12..], &[0x20, 0x00, 0, 0], "LOCAL, UNSPEC");
        assert_eq!(local(Version::V1), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn ipv4_mapped_addresses_are_written_as_ipv4() {
        let client: SocketAddr = "[::ffff:127.0.0.2]:5000".parse().unwrap();
        let local: SocketAddr = "[::ffff:127.0.0.1]:7".parse().unwrap();
        assert_eq!(
            header(Version::V1, Peer::Ip(client), Some(local)),
            b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 7\r\n"
        );
    }
}
