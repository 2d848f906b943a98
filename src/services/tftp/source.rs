//! Where a read transfer's blocks come from: the file, in `octet` mode as is, in `netascii`
//! mode with each LF sent as CR LF and each CR as CR NUL (RFC 1350, after RFC 764).
//!
//! A block is produced from a [`Position`] with pread(2), so any block of the current window
//! can be produced again for a retransmission from the position saved at its start: no
//! buffer of sent data is kept.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;

/// Where the next block starts: a file offset and, in netascii mode, the second byte of a
/// CR LF or CR NUL pair that did not fit in the previous block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Bytes of the file consumed.
    pub offset: u64,
    /// A byte still owed from the last translated character.
    pub pending: Option<u8>,
}

/// Fills `out` (one block) from `file` at `at`; returns the bytes written (fewer than
/// `out.len()` only at end of file) and the position of the next block. `scratch` is the
/// netascii read buffer (`None`: octet mode).
///
/// # Errors
/// pread(2) failed.
pub fn fill(
    file: &File,
    at: Position,
    out: &mut [u8],
    scratch: Option<&mut Vec<u8>>,
) -> io::Result<(usize, Position)> {
    let Some(scratch) = scratch else {
        let mut filled = 0;
        while filled < out.len() {
            match file.read_at(&mut out[filled..], at.offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        return Ok((filled, Position { offset: at.offset + filled as u64, pending: None }));
    };
    let mut position = at;
    let mut filled = 0;
    if let Some(byte) = position.pending.take()
        && !out.is_empty()
    {
        out[0] = byte;
        filled = 1;
    }
    while filled < out.len() {
        scratch.resize(out.len() - filled, 0);
        let n = loop {
            match file.read_at(scratch, position.offset) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if n == 0 {
            break;
        }
        for &byte in &scratch[..n] {
            if filled == out.len() {
                break;
            }
            position.offset += 1;
            let (first, second) = match byte {
                b'\n' => (b'\r', Some(b'\n')),
                b'\r' => (b'\r', Some(0)),
                other => (other, None),
            };
            out[filled] = first;
            filled += 1;
            if let Some(second) = second {
                if filled < out.len() {
                    out[filled] = second;
                    filled += 1;
                } else {
                    position.pending = Some(second);
                }
            }
        }
    }
    Ok((filled, position))
}

/// Bytes an octet-mode transfer reads from its file at once (at least one block): one
/// pread(2) per 128 blocks of 512 bytes instead of one per block.
pub const READ_AHEAD: usize = 64 << 10;

/// A window of the file read ahead, for octet mode: blocks are copied out of it, and a
/// block outside it (the next stretch, or a retransmission from before it) refills it from
/// that block's offset.
#[derive(Debug, Default)]
pub struct ReadAhead {
    start: u64,
    data: Vec<u8>,
    /// The file ends inside `data` (a short read).
    eof: bool,
}

impl ReadAhead {
    /// [`fill`] in octet mode, through the read-ahead window.
    ///
    /// # Errors
    /// pread(2) failed.
    pub fn fill(&mut self, file: &File, at: Position, out: &mut [u8]) -> io::Result<(usize, Position)> {
        let end = self.start + self.data.len() as u64;
        let inside = at.offset >= self.start && at.offset <= end;
        let covered = inside && (self.eof || at.offset + out.len() as u64 <= end);
        if !covered {
            self.data.resize(READ_AHEAD.max(out.len()), 0);
            let (n, _) = fill(file, at, &mut self.data, None)?;
            self.eof = n < self.data.len();
            self.data.truncate(n);
            self.start = at.offset;
        }
        let from = (at.offset - self.start) as usize;
        let n = out.len().min(self.data.len() - from);
        out[..n].copy_from_slice(&self.data[from..from + n]);
        Ok((n, Position { offset: at.offset + n as u64, pending: None }))
    }
}

/// Turns netascii received in a write transfer back into local text: CR LF becomes LF and
/// CR NUL becomes CR. `carry` holds a CR that ended the previous block.
pub fn from_netascii(data: &[u8], carry: &mut bool, out: &mut Vec<u8>) {
    out.clear();
    for &byte in data {
        if std::mem::take(carry) {
            match byte {
                b'\n' => out.push(b'\n'),
                0 => out.push(b'\r'),
                b'\r' => {
                    out.push(b'\r');
                    *carry = true;
                    continue;
                }
                other => out.extend_from_slice(&[b'\r', other]),
            }
        } else if byte == b'\r' {
            *carry = true;
        } else {
            out.push(byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn blocks(content: &[u8], size: usize, netascii: bool) -> Vec<Vec<u8>> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(content).unwrap();
        let mut scratch = Vec::new();
        let mut at = Position::default();
        let mut out = Vec::new();
        loop {
            let mut block = vec![0; size];
            let (n, next) =
                fill(&file, at, &mut block, netascii.then_some(&mut scratch)).unwrap();
            // Producing the same block again from its position gives the same bytes.
            let mut again = vec![0; size];
            assert_eq!(fill(&file, at, &mut again, netascii.then_some(&mut scratch)).unwrap().0, n);
            assert_eq!(again[..n], block[..n]);
            block.truncate(n);
            out.push(block);
            at = next;
            if n < size {
                return out;
            }
        }
    }

    #[test]
    fn read_ahead_gives_the_same_blocks_and_serves_retransmissions() {
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&content).unwrap();
        let mut ahead = ReadAhead::default();
        let mut block = vec![0; 1428];
        let mut at = Position::default();
        let mut got = Vec::new();
        loop {
            let (n, next) = ahead.fill(&file, at, &mut block).unwrap();
            got.extend_from_slice(&block[..n]);
            if n < block.len() {
                break;
            }
            at = next;
        }
        assert_eq!(got, content);
        // Back to an early block (a retransmission after the window moved on).
        let (n, _) = ahead.fill(&file, Position { offset: 1428, pending: None }, &mut block).unwrap();
        assert_eq!(block[..n], content[1428..2856]);
    }

    #[test]
    fn octet_blocks_end_with_a_short_or_empty_one() {
        assert_eq!(blocks(b"", 4, false), [b"".to_vec()]);
        assert_eq!(blocks(b"abcd", 4, false), [b"abcd".to_vec(), b"".to_vec()]);
        assert_eq!(blocks(b"abcde", 4, false), [b"abcd".to_vec(), b"e".to_vec()]);
    }

    #[test]
    fn netascii_translates_across_block_boundaries() {
        let sent: Vec<u8> = blocks(b"abc\nd\re\n", 4, true).concat();
        assert_eq!(sent, b"abc\r\nd\r\0e\r\n");
        assert_eq!(blocks(b"abc\n", 4, true), [b"abc\r".to_vec(), b"\n".to_vec()]);
        let mut back = Vec::new();
        let mut carry = false;
        let mut whole = Vec::new();
        for chunk in sent.chunks(4) {
            from_netascii(chunk, &mut carry, &mut back);
            whole.extend_from_slice(&back);
        }
        assert_eq!(whole, b"abc\nd\re\n");
    }
}
