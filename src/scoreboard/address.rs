//! How the scoreboard keeps an [`Address`]: in [`ADDRESS_WORDS`] words, for the listeners'
//! bound addresses (version 14) and the backend rows (version 11), one encoding for both.
//!
//! Runs wherever the scoreboard is mapped. The bytes, little-endian in the words: a family
//! byte (0: none; 4 or 6: an IP address, `b'u'`: a Unix socket path, `b'a'`: an abstract
//! name), then for an IP address its 16 bytes (IPv4 mapped into IPv6), the port and the
//! IPv6 scope id; for a Unix address a length byte and the path's or name's bytes (at most
//! [`crate::net::MAX_UNIX_PATH`], which fit). The file is not trusted: decoding never
//! panics, an unknown family reads as none and a length is clamped to the space there is.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::net::{Address, MAX_UNIX_PATH};

/// Words of one encoded address.
pub(super) const ADDRESS_WORDS: usize = 14;

/// Bytes of one encoded address.
const ADDRESS_BYTES: usize = ADDRESS_WORDS * 8;

const _: () = assert!(MAX_UNIX_PATH <= ADDRESS_BYTES - 2, "a Unix path fits whole");

/// `address` as the scoreboard keeps it (all zero for none).
pub(super) fn encode(address: Option<&Address>) -> [u64; ADDRESS_WORDS] {
    let mut bytes = [0u8; ADDRESS_BYTES];
    let mut text = |family: u8, raw: &[u8]| {
        let len = raw.len().min(ADDRESS_BYTES - 2);
        bytes[0] = family;
        bytes[1] = len as u8;
        bytes[2..2 + len].copy_from_slice(&raw[..len]);
    };
    match address {
        None => {}
        Some(Address::Unix(path)) => text(b'u', path.as_os_str().as_bytes()),
        Some(Address::Abstract(name)) => text(b'a', name),
        Some(Address::Ip(ip)) => {
            let (family, octets, scope) = match ip {
                SocketAddr::V4(v4) => (4, v4.ip().to_ipv6_mapped().octets(), 0),
                SocketAddr::V6(v6) => (6, v6.ip().octets(), v6.scope_id()),
            };
            bytes[0] = family;
            bytes[1..17].copy_from_slice(&octets);
            bytes[17..19].copy_from_slice(&ip.port().to_le_bytes());
            bytes[19..23].copy_from_slice(&scope.to_le_bytes());
        }
    }
    let mut words = [0u64; ADDRESS_WORDS];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    words
}

/// The address [`encode`] wrote; `None` for none or an unknown family.
pub(super) fn decode(words: &[u64; ADDRESS_WORDS]) -> Option<Address> {
    let mut bytes = [0u8; ADDRESS_BYTES];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    match bytes[0] {
        family @ (4 | 6) => {
            let octets: [u8; 16] = bytes[1..17].try_into().expect("16 bytes");
            let v6 = Ipv6Addr::from(octets);
            let port = u16::from_le_bytes([bytes[17], bytes[18]]);
            let scope = u32::from_le_bytes(bytes[19..23].try_into().expect("4 bytes"));
            Some(Address::Ip(match (family, v6.to_ipv4_mapped()) {
                (4, mapped) => {
                    SocketAddr::new(IpAddr::V4(mapped.unwrap_or(Ipv4Addr::UNSPECIFIED)), port)
                }
                _ => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope)),
            }))
        }
        family @ (b'u' | b'a') => {
            let len = usize::from(bytes[1]).min(ADDRESS_BYTES - 2);
            let raw = &bytes[2..2 + len];
            Some(match family {
                b'u' => Address::Unix(PathBuf::from(OsStr::from_bytes(raw))),
                _ => Address::Abstract(raw.to_vec()),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_address_round_trips_and_a_forged_one_reads_as_none() {
        let longest = format!("unix:/{}", "p".repeat(MAX_UNIX_PATH - 1));
        for text in [
            "127.0.0.1:0",
            "127.0.0.2:65535",
            "[::1]:7",
            "[fe80::1%3]:80",
            "0.0.0.0:69",
            "[::ffff:127.0.0.1]:8",
            "unix:/run/preforkd/echo.sock",
            "unix:@preforkd-echo",
            &longest,
        ] {
            let address: Address = text.parse().unwrap();
            assert_eq!(decode(&encode(Some(&address))), Some(address), "{text}");
        }
        assert_eq!(encode(None), [0; ADDRESS_WORDS]);
        assert_eq!(decode(&[0; ADDRESS_WORDS]), None, "nothing published");
        assert_eq!(decode(&[u64::MAX; ADDRESS_WORDS]), None, "a forged family");
        // A forged length is clamped to the space there is.
        let mut forged = encode(Some(&"unix:/a".parse().unwrap()));
        forged[0] |= 0xff << 8;
        let Some(Address::Unix(path)) = decode(&forged) else { panic!("a path") };
        assert_eq!(path.as_os_str().len(), ADDRESS_BYTES - 2);
    }
}
