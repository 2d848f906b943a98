//! A fake client socket for unit tests of sessions.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::time::Instant;

use super::{Context, Progress};

/// A fake socket: `input` is what the client sent (then its FIN if `eof`), `window` how many
/// bytes the client will accept before writes would block.
pub struct Fake {
    pub input: VecDeque<u8>,
    pub eof: bool,
    pub output: Vec<u8>,
    pub window: usize,
}

impl Fake {
    pub fn new(input: &[u8], eof: bool, window: usize) -> Fake {
        Fake { input: input.iter().copied().collect(), eof, output: Vec::new(), window }
    }
}

impl Read for Fake {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.eof { Ok(0) } else { Err(ErrorKind::WouldBlock.into()) };
        }
        let n = buf.len().min(self.input.len());
        for (slot, byte) in buf.iter_mut().zip(self.input.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

impl Write for Fake {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.window);
        if n == 0 {
            return Err(ErrorKind::WouldBlock.into());
        }
        self.window -= n;
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs one callback over `io`; returns its progress and the close it asked for.
pub fn call(
    io: &mut Fake,
    callback: impl FnOnce(&mut Context<'_>) -> io::Result<Progress>,
) -> io::Result<(Progress, Option<super::CloseReason>)> {
    let mut cx = Context::new(io, Instant::now());
    let progress = callback(&mut cx)?;
    Ok((progress, cx.close.map(|(reason, _)| reason)))
}
