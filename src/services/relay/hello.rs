//! Reading a client's TLS ClientHello without terminating TLS, for routing by the server
//! name it asks for (SNI, RFC 6066 section 3), as nginx's `ssl_preread` and HAProxy's
//! `req.ssl_sni` do.
//!
//! Pure: no I/O. The relay's session reads the client's first bytes into a [`Hello`] until it
//! answers [`Step::Done`] (or refuses); every byte read is kept, and forwarded unchanged to
//! the backend chosen, the ClientHello and whatever followed it. Invariants:
//! - bounded: at most [`MAX_PREREAD`] bytes are kept (the ClientHello, whose handshake
//!   message may be at most [`MAX_HELLO`] bytes, and the headers of the records that carry
//!   it); [`Hello::room`] says how many more may be read, so a caller never reads past it;
//! - whole: a ClientHello that spans several records and several reads (a post-quantum key
//!   share makes it larger than one TCP segment) is reassembled before its name is read;
//! - parsed by rustls (`rustls::server::Acceptor`, given a copy of the bytes): nothing here
//!   parses the ClientHello itself; only the first handshake header is looked at, to refuse
//!   a ClientHello that announces more than [`MAX_HELLO`] bytes without waiting for them;
//! - a refusal is final and says why ([`Refusal`]); feeding bytes after an answer changes
//!   nothing.

use std::fmt;

use rustls::server::Acceptor;

/// Largest ClientHello handshake message accepted, in bytes (its 4-byte header included):
/// 16 KiB, far above what browsers send with post-quantum key shares (about 1.8 KiB).
pub const MAX_HELLO: usize = 16 * 1024;

/// Most bytes read from a client before its ClientHello must be complete: [`MAX_HELLO`] and
/// 1 KiB for the 5-byte headers of the records that carry it (a ClientHello cut into at most
/// about 200 records).
pub const MAX_PREREAD: usize = MAX_HELLO + 1024;

/// A TLS record's header: content type (1), version (2), length (2).
const RECORD_HEADER: usize = 5;
/// The handshake content type (RFC 8446 section 5.1).
const HANDSHAKE: u8 = 22;
/// The ClientHello handshake type.
const CLIENT_HELLO: u8 = 1;

/// Why a ClientHello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The first bytes are not a TLS handshake record (plain text, an old SSLv2 hello).
    NotTls,
    /// The ClientHello announces, or takes, more than the bound.
    TooLarge,
    /// A malformed record or ClientHello, or another handshake message first.
    Malformed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotTls => "not a TLS handshake",
            Refusal::TooLarge => "ClientHello too large",
            Refusal::Malformed => "malformed ClientHello",
        })
    }
}

/// What the bytes so far make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The ClientHello goes on beyond the bytes read: read more (at most [`Hello::room`]).
    More,
    /// A whole ClientHello, asking for this server name (lowercase), or none.
    Done(Option<String>),
    /// Not a ClientHello to route by.
    Refused(Refusal),
}

/// A ClientHello being read.
pub struct Hello {
    /// Every byte read, in order.
    bytes: Vec<u8>,
    /// rustls's parser, fed a copy of them.
    acceptor: Acceptor,
    /// The answer, once there is one.
    answer: Option<Step>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello").field("read", &self.bytes.len()).field("answer", &self.answer).finish()
    }
}

impl Default for Hello {
    fn default() -> Self {
        Hello::new()
    }
}

impl Hello {
    /// Nothing read yet.
    pub fn new() -> Hello {
        Hello { bytes: Vec::new(), acceptor: Acceptor::default(), answer: None }
    }

    /// How many more bytes may be read (0 once answered).
    pub fn room(&self) -> usize {
        if self.answer.is_some() { 0 } else { MAX_PREREAD - self.bytes.len() }
    }

    /// Every byte read so far.
    #[cfg(test)]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes the bytes read, to forward them.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Adds `more` (at most [`Hello::room`] bytes; the excess is ignored) and says what the
    /// bytes so far make. Once it answered [`Step::Done`] or [`Step::Refused`], it keeps that
    /// answer and takes no more bytes.
    pub fn feed(&mut self, more: &[u8]) -> Step {
        if let Some(answer) = &self.answer {
            return answer.clone();
        }
        let more = &more[..more.len().min(self.room())];
        let step = self.step(more);
        if step != Step::More {
            self.answer = Some(step.clone());
        }
        step
    }

    fn step(&mut self, more: &[u8]) -> Step {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(more);
        if let Some(refusal) = announced(&self.bytes) {
            return Step::Refused(refusal);
        }
        let mut rest = &self.bytes[start..];
        while !rest.is_empty() {
            match self.acceptor.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                // rustls's buffer is bounded too (by more than ours): too much, either way.
                Err(_) => return Step::Refused(Refusal::TooLarge),
            }
            match self.acceptor.accept() {
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    let name = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                    return Step::Done(name);
                }
                Err((error, _alert)) => return Step::Refused(classify(&error)),
            }
        }
        if self.bytes.len() >= MAX_PREREAD { Step::Refused(Refusal::TooLarge) } else { Step::More }
    }
}

/// A refusal the first record's header and the ClientHello's header tell before the rest
/// comes: not a handshake record, or a ClientHello announced larger than [`MAX_HELLO`].
fn announced(bytes: &[u8]) -> Option<Refusal> {
    let (&kind, _) = bytes.split_first()?;
    if kind != HANDSHAKE {
        return Some(Refusal::NotTls);
    }
    // The version's first byte is 3 for every TLS version (and SSL 3).
    if bytes.get(1).is_some_and(|&major| major != 3) {
        return Some(Refusal::NotTls);
    }
    let record_len = usize::from(u16::from_be_bytes([*bytes.get(3)?, *bytes.get(4)?]));
    // The handshake header (type, 24-bit length), when the first record holds all of it.
    if record_len < 4 || bytes.len() < RECORD_HEADER + 4 {
        return None;
    }
    let header = &bytes[RECORD_HEADER..RECORD_HEADER + 4];
    if header[0] != CLIENT_HELLO {
        return Some(Refusal::Malformed);
    }
    let length = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    (4 + length > MAX_HELLO).then_some(Refusal::TooLarge)
}

/// The refusal for an error rustls found.
fn classify(error: &rustls::Error) -> Refusal {
    use rustls::{Error, InvalidMessage};
    match error {
        Error::InvalidMessage(
            InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
        ) => Refusal::NotTls,
        Error::InvalidMessage(InvalidMessage::MessageTooLarge) => Refusal::TooLarge,
        _ => Refusal::Malformed,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A real ClientHello, as rustls's client sends it for `name` (with post-quantum key
    /// shares: about 1.8 KiB), in one record.
    pub(in crate::services::relay) fn client_hello(name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(std::iter::empty());
        let config = rustls::ClientConfig::builder_with_provider(crate::pki::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// `hello` (one record) cut into records of at most `size` bytes of payload each.
    fn fragmented(hello: &[u8], size: usize) -> Vec<u8> {
        let (header, payload) = hello.split_at(RECORD_HEADER);
        let mut out = Vec::new();
        for piece in payload.chunks(size) {
            out.extend_from_slice(&header[..3]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    /// Feeds `bytes` in pieces of `size`; the answer and how many bytes it took.
    fn feed_in(bytes: &[u8], size: usize) -> (Step, usize) {
        let mut hello = Hello::new();
        let mut step = Step::More;
        for piece in bytes.chunks(size) {
            step = hello.feed(piece);
            if step != Step::More {
                break;
            }
        }
        (step, hello.bytes().len())
    }

    #[test]
    fn a_whole_client_hello_gives_its_name_however_it_is_cut() {
        let hello = client_hello("A.Example.org");
        assert!(hello.len() > 1200, "a post-quantum key share: {} bytes", hello.len());
        let done = Step::Done(Some("a.example.org".into()));
        assert_eq!(feed_in(&hello, hello.len()), (done.clone(), hello.len()));
        assert_eq!(feed_in(&hello, 1), (done.clone(), hello.len()), "one byte at a time");
        let records = fragmented(&hello, 100);
        assert_eq!(feed_in(&records, 7), (done.clone(), records.len()), "in 100-byte records");
        let tiny = fragmented(&hello, 1);
        assert!(tiny.len() < MAX_PREREAD, "{} bytes in one-byte records", tiny.len());
        assert_eq!(feed_in(&tiny, 4096), (done.clone(), tiny.len()), "in one-byte records");
        // Records of 3 bytes of a hello padded to 10 KiB: the headers overflow the bound.
        let mut padded = hello.clone();
        padded.resize(RECORD_HEADER + 10 * 1024, 0);
        let announced = (padded.len() - RECORD_HEADER - 4) as u32;
        padded[6..9].copy_from_slice(&announced.to_be_bytes()[1..]);
        let record = (padded.len() - RECORD_HEADER) as u16;
        padded[3..5].copy_from_slice(&record.to_be_bytes());
        let (step, read) = feed_in(&fragmented(&padded, 3), 4096);
        assert_eq!((step, read), (Step::Refused(Refusal::TooLarge), MAX_PREREAD));
        // What follows the ClientHello in the same read is kept, to be forwarded.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01early");
        let mut reader = Hello::new();
        assert_eq!(reader.feed(&more), done);
        assert_eq!(reader.into_bytes(), more);
        let ip = client_hello("192.0.2.1");
        assert_eq!(feed_in(&ip, 64).0, Step::Done(None), "an IP address is sent as no name");
    }

    #[test]
    fn garbage_and_oversized_hellos_are_refused_within_the_bound() {
        assert_eq!(feed_in(b"GET / HTTP/1.1\r\n\r\n", 3).0, Step::Refused(Refusal::NotTls));
        assert_eq!(feed_in(b"\x16\x02\x00", 1).0, Step::Refused(Refusal::NotTls));
        assert_eq!(feed_in(b"\x80\x2e\x01\x03\x01", 5).0, Step::Refused(Refusal::NotTls), "SSLv2");
        // A ServerHello where a ClientHello should be.
        assert_eq!(feed_in(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 9).0, Step::Refused(Refusal::Malformed));
        // A ClientHello announced at 64 KiB: refused on its 9th byte.
        let announced = b"\x16\x03\x01\x40\x00\x01\x01\x00\x00";
        assert_eq!(feed_in(announced, 1), (Step::Refused(Refusal::TooLarge), 9));
        // A record that claims more than a ClientHello may hold, never sent whole: refused
        // at the bound, not later.
        let mut endless = b"\x16\x03\x01\x48\x00\x01\x00\x3f\xf0".to_vec();
        endless.resize(MAX_PREREAD + 4096, 0);
        let (step, read) = feed_in(&endless, 1000);
        assert_eq!(step, Step::Refused(Refusal::TooLarge));
        assert!(read <= MAX_PREREAD, "{read}");
        // A ClientHello whose body is garbage.
        let mut hello = client_hello("a.example.org");
        for byte in &mut hello[9 + 40..] {
            *byte = 0xee;
        }
        assert_eq!(feed_in(&hello, 64).0, Step::Refused(Refusal::Malformed));
        // After an answer, nothing more is taken.
        let mut reader = Hello::new();
        assert_eq!(reader.feed(b"plain"), Step::Refused(Refusal::NotTls));
        assert_eq!((reader.room(), reader.feed(b"more")), (0, Step::Refused(Refusal::NotTls)));
        assert_eq!(reader.bytes(), b"plain");
    }

    /// Mutations of a real ClientHello, fed in random pieces: never a panic, never more than
    /// the bound read, and the same answer however the bytes are cut.
    #[test]
    fn mutated_hellos_never_panic_and_answer_the_same_whatever_the_cuts() {
        let base = fragmented(&client_hello("b.example.org"), 300);
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let mut bytes = base.clone();
            for _ in 0..1 + random() % 8 {
                let at = (random() as usize) % bytes.len();
                match random() % 4 {
                    0 => bytes[at] = random() as u8,
                    1 => bytes[at] ^= 1 << (random() % 8),
                    2 => bytes.truncate(at.max(1)),
                    _ => bytes.insert(at, random() as u8),
                }
            }
            let whole = feed_in(&bytes, bytes.len().max(1));
            let cut = 1 + (random() as usize) % 97;
            let pieces = feed_in(&bytes, cut);
            assert!(whole.1 <= MAX_PREREAD && pieces.1 <= MAX_PREREAD, "round {round}");
            assert_eq!(whole.0, pieces.0, "round {round}: cut {cut}");
        }
    }
}
