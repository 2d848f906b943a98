//! One TFTP transfer: a [`Flow`] on its own connected UDP socket (its TID, RFC 1350 section
//! 4), owned by the worker that took the request.
//!
//! Read transfers send a window of `windowsize` DATA blocks (RFC 7440; 1 is RFC 1350's
//! lock-step) and wait for the ACK of its last block. Block numbers are 64-bit inside and
//! sent modulo 65,536, so a transfer longer than 65,535 blocks rolls over to 0, as tftp-hpa,
//! atftp and curl expect. An ACK is mapped back to the one sent block it can name:
//! - the ACK of the block before the window is a duplicate and is ignored: answering it
//!   would send every later block twice (the Sorcerer's Apprentice bug, RFC 1123 4.2.3.1);
//! - the ACK of a block inside the window means the client lost what follows: the next
//!   window starts right after it (RFC 7440 section 4);
//! - anything else is ignored.
//!
//! Only a timeout retransmits: the window from the first unacknowledged block, at most
//! `retries` times in a row, then the transfer ends with result `timeout`.
//!
//! Until the peer answers (the first ACK or DATA that moves the transfer), its address may be
//! forged: the transfer is [`Peer::Unverified`], retransmits at most `unverified_retries`
//! times, then ends with result `no-answer`, and holds a slot of the listener's budget
//! ([`super::budget`]) until it is verified or over.

use std::fs::File;
use std::io::{ErrorKind, Write as _};
use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::budget::Claim;
use super::packet::{self, ACK, DATA, ERROR, ErrorCode};
use super::source::{self, Position};
use super::upload::Upload;
use crate::services::{Flow, Progress, Step};

/// Whether the peer has answered this transfer yet.
#[derive(Debug)]
pub enum Peer {
    /// Nothing from the peer yet: its address may be forged. At most `retries` timeouts in a
    /// row (`unverified_retries`, at most the transfer's own), and a slot of the listener's
    /// budget held (`None` without a budget), given back when this state ends.
    Unverified {
        /// Timeouts in a row allowed.
        retries: u32,
        /// The budget slot.
        #[expect(dead_code, reason = "held for its Drop, which gives the slot back")]
        claim: Option<Claim>,
    },
    /// The peer answered (an ACK or DATA that moved the transfer): it receives what it
    /// asked for, so it is who it claims to be.
    Verified,
}

/// What every transfer shares: its socket, timing and access-log facts.
pub struct Common {
    /// The TID socket, connected to the client's TID.
    pub socket: UdpSocket,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Retransmissions in a row before giving up.
    pub retries: u32,
    /// The file name as requested (for the access log).
    pub file: String,
    /// `octet` or `netascii`.
    pub mode: &'static str,
    /// The options acknowledged, `name=value,...` (for the access log; `-` when none).
    pub options: String,
    /// The OACK to send first and wait for ACK 0 (or DATA 1), if options were acknowledged.
    pub oack: Option<Vec<u8>>,
    /// Bytes sent and received, packet headers and retransmissions included.
    pub totals: Progress,
    /// File bytes transferred (the access log's `bytes=`).
    pub data: u64,
    /// Blocks sent or received, retransmissions excepted.
    pub blocks: u64,
    /// Packets sent again after a timeout.
    pub retransmissions: u64,
    /// Timeouts in a row.
    pub tries: u32,
    /// The `busy_poll` option (see [`Flow::busy_poll`]).
    pub busy_poll: Duration,
    /// Whether the peer has answered.
    pub peer: Peer,
}

impl Common {
    fn send(&mut self, packet: &[u8]) -> Result<(), &'static str> {
        loop {
            match self.socket.send(packet) {
                Ok(n) => {
                    self.totals.bytes_out += n as u64;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A full send buffer loses the packet like the network would: the timeout
                // sends it again.
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    return Err("client-unreachable");
                }
                Err(_) => return Err("send-error"),
            }
        }
    }

    fn send_error(&mut self, code: ErrorCode, message: &str) {
        let _ = self.send(&packet::error(code, message));
    }

    /// Reads one packet into `buffer`; `None` when nothing is waiting.
    fn receive(&mut self, buffer: &mut [u8]) -> Result<Option<usize>, &'static str> {
        loop {
            match self.socket.recv(buffer) {
                Ok(n) => {
                    self.totals.bytes_in += n as u64;
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    return Err("client-unreachable");
                }
                Err(_) => return Err("receive-error"),
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "file={:?} mode={} options={} bytes={} blocks={} retransmissions={}",
            self.file,
            self.mode,
            if self.options.is_empty() { "-" } else { &self.options },
            self.data,
            self.blocks,
            self.retransmissions
        )
    }

    /// The peer answered: it is verified, and its budget slot is given back.
    fn answered(&mut self) {
        self.peer = Peer::Verified;
    }

    /// A timeout: `Some(result)` once the retries are spent, `timeout` for a verified peer,
    /// `no-answer` for one that never answered.
    fn give_up(&mut self) -> Option<&'static str> {
        self.tries += 1;
        let (allowed, result) = match self.peer {
            Peer::Unverified { retries, .. } => (retries.min(self.retries), "no-answer"),
            Peer::Verified => (self.retries, "timeout"),
        };
        (self.tries > allowed).then_some(result)
    }
}

/// Packets read per readiness callback at most (fairness between transfers).
const PACKETS_PER_CALL: usize = 64;

/// A request refused before any transfer: the ERROR is sent from the TID socket at start.
pub struct Refused {
    /// The socket and facts.
    pub common: Common,
    /// The error to send.
    pub code: ErrorCode,
    /// Its message.
    pub message: String,
    /// The access-log result, such as `not-found` or `access-violation`.
    pub result: &'static str,
}

impl Flow for Refused {
    fn socket(&self) -> BorrowedFd<'_> {
        self.common.socket.as_fd()
    }

    fn start(&mut self, _now: Instant) -> Step {
        let message = std::mem::take(&mut self.message);
        self.common.send_error(self.code, &message);
        Step::Done(self.result)
    }

    fn on_readable(&mut self, _now: Instant) -> Step {
        Step::Done(self.result)
    }

    fn on_timer(&mut self, _now: Instant) -> Step {
        Step::Done(self.result)
    }

    fn refuse(&mut self, _reason: &str) {}

    fn totals(&self) -> Progress {
        self.common.totals
    }

    fn describe(&self) -> String {
        self.common.describe()
    }
}

/// Sends the ERROR a refused flow owes its client (per-client limit, budget, shutdown).
fn refusal(common: &mut Common, reason: &str) {
    let message = match reason {
        "limit" => "too many transfers from your address; try again later",
        "shutdown" => "server shutting down",
        _ => "server busy; try again later",
    };
    common.send_error(ErrorCode::Undefined, message);
}

/// A read request being served.
pub struct Read {
    /// Socket, timing, facts.
    pub common: Common,
    /// The open file.
    pub file: File,
    /// Data bytes per block (512, or the negotiated `blksize`).
    pub blksize: usize,
    /// Blocks per window (1, or the negotiated `windowsize`).
    pub windowsize: u64,
    /// Netascii read buffer (`None`: octet).
    pub scratch: Option<Vec<u8>>,
    /// Octet mode's read-ahead.
    pub ahead: source::ReadAhead,
    /// Waiting for ACK 0 of the OACK.
    pub negotiating: bool,
    /// First block not acknowledged (blocks count from 1).
    pub base: u64,
    /// Next block to send.
    pub next: u64,
    /// Where each block from `base` to `next` (inclusive) starts.
    pub positions: std::collections::VecDeque<Position>,
    /// The number of the final (short) block, once produced.
    pub last: Option<u64>,
    /// The highest block ever sent (to tell retransmissions from first sends).
    pub highest: u64,
    /// One packet: header and data.
    pub packet: Vec<u8>,
}

impl Read {
    /// A transfer of `file` with the given block and window sizes.
    pub fn new(common: Common, file: File, blksize: usize, windowsize: u64, netascii: bool) -> Self {
        Read {
            negotiating: common.oack.is_some(),
            common,
            file,
            blksize,
            windowsize,
            scratch: netascii.then(Vec::new),
            ahead: source::ReadAhead::default(),
            base: 1,
            next: 1,
            positions: [Position::default()].into(),
            last: None,
            highest: 0,
            packet: Vec::new(),
        }
    }

    /// Sends blocks from `next` to the end of the window (or the final block).
    fn send_window(&mut self, now: Instant) -> Step {
        while self.next < self.base + self.windowsize && self.last.is_none_or(|l| self.next <= l) {
            let at = *self.positions.back().expect("the position of `next` is kept");
            self.packet.resize(4 + self.blksize, 0);
            let out = &mut self.packet[4..];
            let filled = match self.scratch.as_mut() {
                Some(scratch) => source::fill(&self.file, at, out, Some(scratch)),
                None => self.ahead.fill(&self.file, at, out),
            };
            let (n, following) = match filled {
                Ok(read) => read,
                Err(_) => {
                    self.common.send_error(ErrorCode::Undefined, "read error");
                    return Step::Done("read-error");
                }
            };
            self.packet.truncate(4 + n);
            self.packet[..2].copy_from_slice(&DATA.to_be_bytes());
            self.packet[2..4].copy_from_slice(&(self.next as u16).to_be_bytes());
            if n < self.blksize {
                self.last = Some(self.next);
            }
            if self.next > self.highest {
                self.highest = self.next;
                self.common.blocks += 1;
                self.common.data += n as u64;
            } else {
                self.common.retransmissions += 1;
            }
            let packet = std::mem::take(&mut self.packet);
            let sent = self.common.send(&packet);
            self.packet = packet;
            if let Err(result) = sent {
                return Step::Done(result);
            }
            self.positions.push_back(following);
            self.next += 1;
        }
        Step::Wait(now + self.common.timeout)
    }

    /// Starts the next window at `base` again (after a timeout or a gap).
    fn rewind(&mut self) {
        self.next = self.base;
        self.positions.truncate(1);
    }

    fn on_ack(&mut self, block: u16, now: Instant) -> Option<Step> {
        if self.negotiating {
            if block != 0 {
                return None;
            }
            self.negotiating = false;
            self.common.tries = 0;
            self.common.answered();
            return Some(self.send_window(now));
        }
        let before = self.base - 1;
        // A duplicate or a block not sent is never answered (Sorcerer's Apprentice).
        let acked = acked_block(self.base, self.next, block)?;
        for _ in before..acked {
            self.positions.pop_front();
        }
        self.base = acked + 1;
        self.common.tries = 0;
        self.common.answered();
        if self.last == Some(acked) {
            return Some(Step::Done("complete"));
        }
        if self.base < self.next {
            self.rewind(); // the client missed what followed `acked`
        }
        Some(self.send_window(now))
    }
}

impl Flow for Read {
    fn socket(&self) -> BorrowedFd<'_> {
        self.common.socket.as_fd()
    }

    fn busy_poll(&self) -> Duration {
        self.common.busy_poll
    }

    fn start(&mut self, now: Instant) -> Step {
        match self.common.oack.clone() {
            Some(oack) => match self.common.send(&oack) {
                Ok(()) => Step::Wait(now + self.common.timeout),
                Err(result) => Step::Done(result),
            },
            None => self.send_window(now),
        }
    }

    fn on_readable(&mut self, now: Instant) -> Step {
        let mut buffer = [0u8; 516];
        for _ in 0..PACKETS_PER_CALL {
            let n = match self.common.receive(&mut buffer) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(result) => return Step::Done(result),
            };
            match packet::header(&buffer[..n]) {
                // An ACK that moved the transfer sent the next window: the client's next
                // ACK cannot be here yet, so skip the read that would say WouldBlock (the
                // poller is level-triggered: anything else waiting wakes the loop again).
                Some((ACK, block)) => {
                    if let Some(next) = self.on_ack(block, now) {
                        return next;
                    }
                }
                Some((ERROR, _)) => return Step::Done("client-error"),
                _ => {}
            }
        }
        // Nothing new (a duplicate, a stray packet): the deadline of the last send stands.
        Step::Unchanged
    }

    fn on_timer(&mut self, now: Instant) -> Step {
        if let Some(result) = self.common.give_up() {
            return Step::Done(result);
        }
        if self.negotiating {
            self.common.retransmissions += 1;
            let oack = self.common.oack.clone().unwrap_or_default();
            return match self.common.send(&oack) {
                Ok(()) => Step::Wait(now + self.common.timeout),
                Err(result) => Step::Done(result),
            };
        }
        self.rewind();
        self.send_window(now)
    }

    fn refuse(&mut self, reason: &str) {
        refusal(&mut self.common, reason);
    }

    fn totals(&self) -> Progress {
        self.common.totals
    }

    fn describe(&self) -> String {
        self.common.describe()
    }
}

/// The block a wire ACK number names: the one sent block in `base..next` whose number is
/// `wire` modulo 65,536; `None` for the ACK of `base - 1` (a duplicate) or of anything not
/// sent.
fn acked_block(base: u64, next: u64, wire: u16) -> Option<u64> {
    let before = base - 1;
    let acked = before + u64::from(wire.wrapping_sub(before as u16));
    (acked != before && acked < next).then_some(acked)
}

/// A write request being served (`allow_write = true`): lock-step, one ACK per block. The
/// data goes to an [`Upload`], named only once the last block is in.
pub struct Write {
    /// Socket, timing, facts.
    pub common: Common,
    /// The new file, without a name until the transfer completes.
    pub upload: Upload,
    /// Data bytes per block.
    pub blksize: usize,
    /// Netascii translation state (`None`: octet): a CR ending the last block.
    pub netascii: Option<bool>,
    /// Largest file accepted, in bytes.
    pub max_size: u64,
    /// Bytes written.
    pub written: u64,
    /// Last block acknowledged (64-bit; 0 is the request).
    pub acked: u64,
    /// The final block was received and acknowledged: answering duplicates until the timer.
    pub finished: bool,
    /// Translated data.
    pub scratch: Vec<u8>,
    /// One packet as received: header and up to `blksize` bytes (kept between calls).
    pub packet: Vec<u8>,
}

impl Write {
    fn send_ack(&mut self) -> Result<(), &'static str> {
        let ack = packet::ack(self.acked as u16);
        self.common.send(&ack)
    }

    /// Ends the transfer with an ERROR; the upload is dropped with it, unnamed.
    fn fail(&mut self, code: ErrorCode, message: &str, result: &'static str) -> Step {
        self.common.send_error(code, message);
        Step::Done(result)
    }

    fn on_data(&mut self, block: u16, data: &[u8], now: Instant) -> Option<Step> {
        let expected = self.acked + 1;
        if block == self.acked as u16 {
            // The client missed our ACK: send it again (a receiver's duplicate is safe).
            return Some(match self.send_ack() {
                Ok(()) => Step::Wait(now + self.common.timeout),
                Err(result) => Step::Done(result),
            });
        }
        if self.finished || block != expected as u16 {
            return None;
        }
        self.common.answered();
        let bytes = match self.netascii.as_mut() {
            Some(carry) => {
                source::from_netascii(data, carry, &mut self.scratch);
                &self.scratch[..]
            }
            None => data,
        };
        if self.written + bytes.len() as u64 > self.max_size {
            return Some(self.fail(ErrorCode::DiskFull, "file too large", "too-large"));
        }
        if self.upload.file().write_all(bytes).is_err() {
            return Some(self.fail(ErrorCode::DiskFull, "write error", "write-error"));
        }
        self.written += bytes.len() as u64;
        self.common.data += bytes.len() as u64;
        self.acked = expected;
        self.common.blocks += 1;
        self.common.tries = 0;
        if data.len() < self.blksize {
            // The last block: the file gets its name before the client hears it is stored.
            if self.netascii == Some(true) && self.upload.file().write_all(b"\r").is_err() {
                return Some(self.fail(ErrorCode::DiskFull, "write error", "write-error"));
            }
            if let Err((code, message, result)) = self.upload.commit() {
                return Some(self.fail(code, message, result));
            }
            self.finished = true;
        }
        if let Err(result) = self.send_ack() {
            return Some(Step::Done(result));
        }
        Some(Step::Wait(now + self.common.timeout))
    }

    /// Reads and handles the DATA packets waiting, into `buffer` (one packet's room).
    fn receive_data(&mut self, buffer: &mut [u8], now: Instant) -> Step {
        let mut step = Step::Unchanged;
        for _ in 0..PACKETS_PER_CALL {
            let n = match self.common.receive(buffer) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(result) => return Step::Done(result),
            };
            match packet::header(&buffer[..n]) {
                Some((DATA, block)) => {
                    if let Some(next) = self.on_data(block, &buffer[4..n], now) {
                        if let Step::Done(_) = next {
                            return next;
                        }
                        step = next;
                    }
                }
                Some((ERROR, _)) => return Step::Done("client-error"),
                _ => {}
            }
        }
        step
    }
}

impl Flow for Write {
    fn socket(&self) -> BorrowedFd<'_> {
        self.common.socket.as_fd()
    }

    fn busy_poll(&self) -> Duration {
        self.common.busy_poll
    }

    fn start(&mut self, now: Instant) -> Step {
        let first = self.common.oack.clone().unwrap_or_else(|| packet::ack(0).to_vec());
        match self.common.send(&first) {
            Ok(()) => Step::Wait(now + self.common.timeout),
            Err(result) => Step::Done(result),
        }
    }

    fn on_readable(&mut self, now: Instant) -> Step {
        let mut buffer = std::mem::take(&mut self.packet);
        buffer.resize(4 + self.blksize, 0);
        let step = self.receive_data(&mut buffer, now);
        self.packet = buffer;
        step
    }

    fn on_timer(&mut self, now: Instant) -> Step {
        if self.finished {
            // Dallied long enough for a lost final ACK to be asked for again.
            return Step::Done("complete");
        }
        if let Some(result) = self.common.give_up() {
            return Step::Done(result);
        }
        self.common.retransmissions += 1;
        let resend = match (&self.common.oack, self.acked) {
            (Some(oack), 0) => oack.clone(),
            _ => packet::ack(self.acked as u16).to_vec(),
        };
        match self.common.send(&resend) {
            Ok(()) => Step::Wait(now + self.common.timeout),
            Err(result) => Step::Done(result),
        }
    }

    fn refuse(&mut self, reason: &str) {
        refusal(&mut self.common, reason);
    }

    fn totals(&self) -> Progress {
        self.common.totals
    }

    fn describe(&self) -> String {
        self.common.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn acks_map_to_sent_blocks_across_the_rollover() {
        assert_eq!(acked_block(1, 2, 1), Some(1));
        assert_eq!(acked_block(2, 3, 1), None, "duplicate of the last ACK");
        assert_eq!(acked_block(2, 3, 3), None, "not sent yet");
        // Window of 16 across 65,535 -> 0: block 65,536 is sent as 0.
        assert_eq!(acked_block(65_530, 65_546, 0), Some(65_536));
        assert_eq!(acked_block(65_530, 65_546, 65_535), Some(65_535));
        assert_eq!(acked_block(65_537, 65_553, 0), None, "block 65,536 again: a duplicate");
        assert_eq!(acked_block(131_072, 131_073, 0), Some(131_072), "second rollover");
    }

    fn pair() -> (UdpSocket, UdpSocket) {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.connect(client.local_addr().unwrap()).unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        server.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        (client, server)
    }

    fn common(socket: UdpSocket) -> Common {
        Common {
            socket,
            timeout: Duration::from_secs(1),
            retries: 2,
            file: "f".into(),
            mode: "octet",
            options: String::new(),
            oack: None,
            totals: Progress::default(),
            data: 0,
            blocks: 0,
            retransmissions: 0,
            tries: 0,
            busy_poll: Duration::ZERO,
            peer: Peer::Unverified { retries: 1, claim: None },
        }
    }

    /// Every packet waiting at the client (loopback delivers at send).
    fn drain(client: &UdpSocket) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        let mut buffer = [0u8; 600];
        while let Ok(n) = client.recv(&mut buffer) {
            packets.push(buffer[..n].to_vec());
        }
        packets
    }

    #[test]
    fn a_duplicate_ack_sends_nothing_and_a_timeout_resends_until_the_retries_run_out() {
        let (client, server) = pair();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 20]).unwrap();
        let mut read = Read::new(common(server), file, 8, 1, false);
        let t0 = Instant::now();
        assert_eq!(read.start(t0), Step::Wait(t0 + Duration::from_secs(1)));
        assert_eq!(drain(&client), [[&[0, 3, 0, 1][..], &[7; 8]].concat()]);
        client.send(&packet::ack(1)).unwrap();
        client.send(&packet::ack(1)).unwrap();
        read.on_readable(t0);
        let sent = drain(&client);
        assert_eq!(sent.len(), 1, "DATA 2 once, not once per ACK 1: {sent:?}");
        assert_eq!(sent[0][..4], [0, 3, 0, 2]);
        // Silence: DATA 2 again, twice, then the transfer gives up.
        assert!(matches!(read.on_timer(t0), Step::Wait(_)));
        assert!(matches!(read.on_timer(t0), Step::Wait(_)));
        assert_eq!(drain(&client).len(), 2);
        assert_eq!(read.on_timer(t0), Step::Done("timeout"));
        assert_eq!(read.common.retransmissions, 2);
        assert!(read.describe().contains("bytes=16 blocks=2 retransmissions=2"), "{}", read.describe());
    }

    #[test]
    fn a_peer_that_never_answers_gets_fewer_retransmissions_and_answering_frees_its_slot() {
        use std::num::NonZeroUsize;
        use std::sync::Arc;

        use crate::services::tftp::budget::Budget;
        let budget = Arc::new(Budget::new(NonZeroUsize::new(1).unwrap()).unwrap());
        let hold = Duration::from_secs(60);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 20]).unwrap();
        let t0 = Instant::now();
        // Silent: DATA 1 once more (unverified_retries 1 of retries 2), then `no-answer`.
        let (client, server) = pair();
        let mut silent = common(server);
        silent.peer = Peer::Unverified { retries: 1, claim: budget.claim(0, hold) };
        assert!(budget.claim(0, hold).is_none(), "the silent transfer holds the only slot");
        let mut read = Read::new(silent, file.try_clone().unwrap(), 8, 1, false);
        read.start(t0);
        assert!(matches!(read.on_timer(t0), Step::Wait(_)));
        assert_eq!(read.on_timer(t0), Step::Done("no-answer"));
        assert_eq!(drain(&client).len(), 2, "DATA 1 and one retransmission");
        drop(read);
        // Answering: the slot is given back at once, and the full retries apply.
        let (client, server) = pair();
        let mut lossy = common(server);
        lossy.peer = Peer::Unverified { retries: 1, claim: budget.claim(0, hold) };
        let mut read = Read::new(lossy, file, 8, 1, false);
        read.start(t0);
        assert!(matches!(read.on_timer(t0), Step::Wait(_)), "the first DATA 1 was lost");
        client.send(&packet::ack(1)).unwrap();
        read.on_readable(t0);
        assert!(budget.claim(0, hold).is_some(), "verified: its slot is free");
        assert!(matches!(read.on_timer(t0), Step::Wait(_)));
        assert!(matches!(read.on_timer(t0), Step::Wait(_)));
        assert_eq!(read.on_timer(t0), Step::Done("timeout"));
    }

    #[test]
    fn a_window_restarts_after_the_last_block_the_client_got() {
        let (client, server) = pair();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&(0..40u8).collect::<Vec<_>>()).unwrap();
        let mut read = Read::new(common(server), file, 8, 4, false);
        let t0 = Instant::now();
        read.start(t0);
        let blocks: Vec<u8> = drain(&client).iter().map(|p| p[3]).collect();
        assert_eq!(blocks, [1, 2, 3, 4]);
        client.send(&packet::ack(2)).unwrap(); // lost 3 and 4
        read.on_readable(t0);
        let blocks: Vec<u8> = drain(&client).iter().map(|p| p[3]).collect();
        assert_eq!(blocks, [3, 4, 5, 6], "resent from 3; block 6 is the empty last one");
        client.send(&packet::ack(6)).unwrap();
        assert_eq!(read.on_readable(t0), Step::Done("complete"));
    }
}
