//! TFTP packets (RFC 1350 section 5, RFC 2347 for OACK): parsing requests and building the
//! packets a server sends. Pure functions over byte slices.

/// Read request.
pub const RRQ: u16 = 1;
/// Write request.
pub const WRQ: u16 = 2;
/// Data block.
pub const DATA: u16 = 3;
/// Acknowledgement.
pub const ACK: u16 = 4;
/// Error.
pub const ERROR: u16 = 5;
/// Option acknowledgement (RFC 2347).
pub const OACK: u16 = 6;

/// RFC 1350 error codes (and RFC 2347's 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined, see the message.
    Undefined = 0,
    /// File not found.
    NotFound = 1,
    /// Access violation.
    AccessViolation = 2,
    /// Disk full or allocation exceeded.
    DiskFull = 3,
    /// Illegal TFTP operation.
    IllegalOperation = 4,
    /// File already exists.
    FileExists = 6,
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// [`RRQ`] or [`WRQ`].
    pub opcode: u16,
    /// The file name as sent (bytes; not necessarily UTF-8).
    pub filename: Vec<u8>,
    /// The mode, lowercased: `octet`, `netascii`, `mail` ...
    pub mode: String,
    /// Options (RFC 2347), names lowercased, in the order sent; duplicates keep the first.
    pub options: Vec<(String, String)>,
}

/// Parses an RRQ or WRQ; `None` when malformed (the caller answers with error 4).
pub fn parse_request(packet: &[u8]) -> Option<Request> {
    let opcode = u16::from_be_bytes([*packet.first()?, *packet.get(1)?]);
    if opcode != RRQ && opcode != WRQ {
        return None;
    }
    let body = &packet[2..];
    // Every field ends with a NUL; the packet ends with one.
    if body.last() != Some(&0) {
        return None;
    }
    let mut fields = body[..body.len() - 1].split(|&b| b == 0);
    let filename = fields.next()?.to_vec();
    let mode = String::from_utf8(fields.next()?.to_vec()).ok()?.to_ascii_lowercase();
    if filename.is_empty() || mode.is_empty() {
        return None;
    }
    let mut options: Vec<(String, String)> = Vec::new();
    while let Some(name) = fields.next() {
        let value = fields.next()?;
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        let name = name.to_ascii_lowercase();
        if !options.iter().any(|(n, _)| *n == name) {
            options.push((name, value.to_owned()));
        }
    }
    Some(Request { opcode, filename, mode, options })
}

/// An ERROR packet.
pub fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut packet = Vec::with_capacity(5 + message.len());
    packet.extend_from_slice(&ERROR.to_be_bytes());
    packet.extend_from_slice(&(code as u16).to_be_bytes());
    packet.extend_from_slice(message.as_bytes());
    packet.push(0);
    packet
}

/// An OACK packet with `options`.
pub fn oack(options: &[(String, String)]) -> Vec<u8> {
    let mut packet = OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        packet.extend_from_slice(name.as_bytes());
        packet.push(0);
        packet.extend_from_slice(value.as_bytes());
        packet.push(0);
    }
    packet
}

/// An ACK packet for `block`.
pub fn ack(block: u16) -> [u8; 4] {
    let [a, b] = ACK.to_be_bytes();
    let [c, d] = block.to_be_bytes();
    [a, b, c, d]
}

/// The opcode and block number of a DATA or ACK packet (or the code of an ERROR).
pub fn header(packet: &[u8]) -> Option<(u16, u16)> {
    if packet.len() < 4 {
        return None;
    }
    Some((u16::from_be_bytes([packet[0], packet[1]]), u16::from_be_bytes([packet[2], packet[3]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_options_and_reject_garbage() {
        let packet = b"\x00\x01dir/file.bin\x00OCTET\x00blksize\x001428\x00TSize\x000\x00";
        let request = parse_request(packet).unwrap();
        assert_eq!(request.opcode, RRQ);
        assert_eq!(request.filename, b"dir/file.bin");
        assert_eq!(request.mode, "octet");
        assert_eq!(request.options, [("blksize".into(), "1428".into()), ("tsize".into(), "0".into())]);
        assert!(parse_request(b"\x00\x01file\x00octet").is_none(), "no final NUL");
        assert!(parse_request(b"\x00\x01\x00octet\x00").is_none(), "empty name");
        assert!(parse_request(b"\x00\x03file\x00octet\x00").is_none(), "DATA is no request");
        assert!(parse_request(b"\x00\x01file\x00octet\x00blksize\x00").is_none(), "odd options");
        assert_eq!(error(ErrorCode::NotFound, "x"), b"\x00\x05\x00\x01x\x00");
        assert_eq!(ack(65535), [0, 4, 255, 255]);
    }
}
