//! TFTP, RFC 1350: read requests (and, with `allow_write`, write requests) for files under
//! `root`, with option negotiation (RFC 2347): `blksize` (RFC 2348), `timeout` and `tsize`
//! (RFC 2349) and `windowsize` (RFC 7440). UDP only.
//!
//! A request on the listener's socket becomes a transfer ([`transfer`]) on a new socket of
//! its own, bound to an ephemeral port (its TID) and connected to the client's, so the kernel
//! drops packets from any other TID. The worker that took the request owns the transfer; the
//! loop counts it against `max_connections_per_client` (concurrent transfers per client
//! address, exact across workers) and `max_connections_per_worker`, and writes one access
//! line per transfer: client, file, mode, options, bytes, blocks, retransmissions, duration
//! and result.
//!
//! Paths are confined to `root` by the kernel: the file is opened with openat2(2) from a
//! descriptor of `root` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`, so a `..` or a
//! symbolic link that leads outside fails (`EXDEV`) with error 2 (access violation) before
//! anything is read. An absolute name is taken relative to `root`; a name with a `..`
//! component is refused outright; only regular files are served, and a file with more than
//! one hard link is refused (another name for it may lie outside `root`). openat2 comes from
//! `nix` (already a dependency); `cap-std` would do the same through more layers. An upload
//! gets its name only when complete ([`upload`]).
//!
//! Reflection: a request's address may be forged. Until its peer answers, a transfer is
//! unverified ([`transfer::Peer`]): few retransmissions (`unverified_retries`) and a slot of
//! the listener-wide budget (`max_unverified_transfers`, [`budget`]); a request beyond the
//! budget is dropped unanswered. A malformed datagram is answered only when the error is no
//! larger than it.
//!
//! Options (`[listener.options]`): `root` (required), `timeout`, `retries`, `max_blksize`,
//! `max_windowsize`, `allow_write`, `create_mode`, `max_write_size`, `busy_poll`,
//! `unverified_retries`, `max_unverified_transfers`.

mod budget;
mod packet;
mod source;
mod transfer;
mod upload;

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

use super::{
    Answer, CloseReason, ConnInfo, Context, DatagramService, Flow, Interest, Invalid, Options,
    Progress, Service, Session,
};
use budget::{Budget, Claim};
use packet::{ErrorCode, RRQ};
use transfer::{Common, Peer, Read, Refused, Write};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "tftp";

/// RFC 1350's block size.
pub const DEFAULT_BLKSIZE: usize = 512;
/// RFC 2348's largest block size.
pub const MAX_BLKSIZE: usize = 65464;
/// Default of `timeout`: the retransmission timeout when the client asks for none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default of `retries`.
pub const DEFAULT_RETRIES: u32 = 5;
/// Default of `max_windowsize`.
pub const DEFAULT_MAX_WINDOWSIZE: u64 = 64;
/// Default of `max_write_size`: 32 MiB.
pub const DEFAULT_MAX_WRITE_SIZE: u64 = 32 << 20;
/// Default of `busy_poll`: 50 µs, about a loopback round trip with a wake-up on each end.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);
/// Largest `busy_poll`: 1 ms.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(1);
/// Default of `unverified_retries`: one retransmission to a peer that has not answered, so a
/// client that lost the first packet still gets it.
pub const DEFAULT_UNVERIFIED_RETRIES: u32 = 1;
/// Default of `max_unverified_transfers`.
pub const DEFAULT_MAX_UNVERIFIED_TRANSFERS: usize = 32;
/// Largest `max_unverified_transfers` (each request scans the budget's slots).
pub const MAX_UNVERIFIED_TRANSFERS: usize = 4096;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TftpOptions {
    root: Option<String>,
    timeout: Option<String>,
    retries: Option<i64>,
    max_blksize: Option<i64>,
    max_windowsize: Option<i64>,
    allow_write: Option<bool>,
    create_mode: Option<String>,
    max_write_size: Option<i64>,
    busy_poll: Option<String>,
    unverified_retries: Option<i64>,
    max_unverified_transfers: Option<i64>,
}

/// The TFTP service: built from `[listener.options]`.
#[derive(Debug, Clone)]
pub struct Tftp {
    /// Directory files are served from (absolute). Required.
    pub root: PathBuf,
    /// Retransmission timeout when the client does not negotiate one. Default 1 s; from
    /// 10 ms to 255 s.
    pub timeout: Duration,
    /// Timeouts in a row before a transfer is abandoned. Default 5; 1 to 100.
    pub retries: u32,
    /// Largest `blksize` granted. Default 65464 (RFC 2348's maximum); 8 to 65464.
    pub max_blksize: usize,
    /// Largest `windowsize` granted. Default 64; 1 to 65535.
    pub max_windowsize: u64,
    /// Accept write requests (new files only). Default `false`: WRQ gets error 2.
    pub allow_write: bool,
    /// Permissions of files written. Default `0o644`; at most `0o777`.
    pub create_mode: u32,
    /// Largest file a write request may create, in bytes. Default 32 MiB.
    pub max_write_size: u64,
    /// How long a worker whose only work is this transfer polls (waits with a zero timeout)
    /// for the client's answer instead of sleeping, after the model of Linux's
    /// `net.core.busy_poll` (socket(7)); see [`Flow::busy_poll`]. Adaptive: a client that
    /// does not answer within it is not polled for again for the next 1 to 1023 packets.
    /// Default 50 µs; at most 1 ms; 0 never polls.
    pub busy_poll: Duration,
    /// Timeouts in a row before a transfer whose peer has never answered is abandoned
    /// (result `no-answer`): retransmissions to an address that may be forged. Default 1;
    /// 0 to 100, and never more than `retries`.
    pub unverified_retries: u32,
    /// Transfers whose peer has not answered yet, at once, over every worker of the listener
    /// (the listener-wide budget): a request beyond it is dropped unanswered, counted and
    /// logged. `None` (written 0): no budget. Default 32; at most 4096.
    pub budget: Option<Arc<Budget>>,
}

/// Builds the service from its options.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    let parsed: TftpOptions = options.parse()?;
    let root = match parsed.root {
        Some(root) if root.starts_with('/') => PathBuf::from(root),
        Some(_) => {
            options.report("root", "must be an absolute path");
            PathBuf::new()
        }
        None => {
            options.report("root", "missing: tftp needs the directory it serves");
            PathBuf::new()
        }
    };
    let timeout = match parsed.timeout.as_deref().map(humantime::parse_duration) {
        None => DEFAULT_TIMEOUT,
        Some(Ok(t)) if (Duration::from_millis(10)..=Duration::from_secs(255)).contains(&t) => t,
        Some(_) => {
            options.report("timeout", "must be a duration from \"10ms\" to \"255s\"");
            DEFAULT_TIMEOUT
        }
    };
    let busy_poll = match parsed.busy_poll.as_deref().map(humantime::parse_duration) {
        None => DEFAULT_BUSY_POLL,
        Some(Ok(t)) if t <= MAX_BUSY_POLL => t,
        Some(_) => {
            options.report("busy_poll", "must be a duration from \"0s\" to \"1ms\"");
            DEFAULT_BUSY_POLL
        }
    };
    let mut integer = |key: &str, value: Option<i64>, min: i64, max: i64, default: i64| {
        match value {
            None => default,
            Some(n) if (min..=max).contains(&n) => n,
            Some(n) => {
                options.report(key, format!("{n} is out of range: expected {min} to {max}"));
                default
            }
        }
    };
    let retries = integer("retries", parsed.retries, 1, 100, DEFAULT_RETRIES.into()) as u32;
    let unverified_retries = integer(
        "unverified_retries",
        parsed.unverified_retries,
        0,
        100,
        DEFAULT_UNVERIFIED_RETRIES.into(),
    ) as u32;
    let max_unverified = integer(
        "max_unverified_transfers",
        parsed.max_unverified_transfers,
        0,
        MAX_UNVERIFIED_TRANSFERS as i64,
        DEFAULT_MAX_UNVERIFIED_TRANSFERS as i64,
    ) as usize;
    let max_blksize =
        integer("max_blksize", parsed.max_blksize, 8, MAX_BLKSIZE as i64, MAX_BLKSIZE as i64);
    let max_windowsize =
        integer("max_windowsize", parsed.max_windowsize, 1, 65535, DEFAULT_MAX_WINDOWSIZE as i64);
    let max_write_size = integer(
        "max_write_size",
        parsed.max_write_size,
        0,
        i64::MAX,
        DEFAULT_MAX_WRITE_SIZE as i64,
    );
    let create_mode = match parsed.create_mode.as_deref().map(|m| u32::from_str_radix(m, 8)) {
        None => 0o644,
        Some(Ok(mode)) if mode <= 0o777 => mode,
        Some(_) => {
            options.report("create_mode", "must be octal permissions such as \"0644\"");
            0o644
        }
    };
    let budget = match std::num::NonZeroUsize::new(max_unverified).map(Budget::new) {
        None => None,
        Some(Ok(budget)) => Some(Arc::new(budget)),
        Some(Err(error)) => {
            options.report("max_unverified_transfers", format!("could not map its table: {error}"));
            None
        }
    };
    options.finish(Arc::new(Tftp {
        root,
        timeout,
        retries,
        max_blksize: max_blksize as usize,
        max_windowsize: max_windowsize as u64,
        allow_write: parsed.allow_write.unwrap_or(false),
        create_mode,
        max_write_size: max_write_size as u64,
        busy_poll,
        unverified_retries,
        budget,
    }) as Arc<dyn Service>)
}

impl Service for Tftp {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(NoStream)
    }

    fn stream(&self) -> Result<(), &'static str> {
        Err("TFTP is a UDP protocol (RFC 1350)")
    }

    fn datagram(&self) -> Result<&dyn DatagramService, &'static str> {
        Ok(self)
    }
}

/// Never made: `check` refuses tftp on a TCP listener.
struct NoStream;

impl Session for NoStream {
    fn interest(&self) -> Interest {
        Interest::NONE
    }
    fn on_readable(&mut self, cx: &mut Context<'_>) -> std::io::Result<Progress> {
        cx.close(CloseReason::Error);
        Ok(Progress::default())
    }
    fn on_writable(&mut self, cx: &mut Context<'_>) -> std::io::Result<Progress> {
        cx.close(CloseReason::Error);
        Ok(Progress::default())
    }
    fn is_at_rest(&self) -> bool {
        true
    }
    fn is_done(&self) -> bool {
        true
    }
}

impl DatagramService for Tftp {
    fn on_datagram(
        &self,
        request: &[u8],
        peer: SocketAddr,
        local: SocketAddr,
        _now: Instant,
        reply: &mut Vec<u8>,
    ) -> Answer {
        let Some(parsed) = packet::parse_request(request) else {
            // Answered only when the answer is no larger than the datagram: a forged one
            // draws no more than it costs.
            let error = packet::error(ErrorCode::IllegalOperation, "not a TFTP request");
            if error.len() > request.len() {
                return Answer::Ignore;
            }
            reply.extend(error);
            return Answer::Reply;
        };
        let claim = match &self.budget {
            None => None,
            Some(budget) => {
                let now_ms = crate::clock::monotonic_ms();
                match budget.claim(now_ms, self.unverified_hold(&parsed)) {
                    Some(claim) => Some(claim),
                    None => {
                        if let Some((recent, total)) = budget.refuse(now_ms) {
                            log::warn!(
                                "tftp on {local}: dropped {recent} request(s) unanswered, the last from {}: max_unverified_transfers ({}) transfers wait for their peer's first answer (a spoofed flood?); {total} since the last reload",
                                peer.ip(),
                                budget.slots()
                            );
                        }
                        return Answer::Unverified;
                    }
                }
            }
        };
        let socket = match tid_socket(local, peer) {
            Ok(socket) => socket,
            Err(error) => {
                log::warn!("tftp: no socket for a transfer to {peer}: {error}");
                reply.extend(packet::error(ErrorCode::Undefined, "server out of resources"));
                return Answer::Reply;
            }
        };
        Answer::Flow(self.transfer(parsed, socket, claim))
    }
}

/// A new UDP socket on an ephemeral port of the listener's address, connected to the
/// client's TID: non-blocking and close-on-exec.
fn tid_socket(local: SocketAddr, peer: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    if local.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    let mut bind = local;
    bind.set_port(0);
    socket.bind(&bind.into())?;
    socket.connect(&peer.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl Tftp {
    /// How long a transfer of `request` may stay unverified: its timeouts before it gives up
    /// (with the timeout it asks for, if any), and one more for a busy worker's lateness.
    fn unverified_hold(&self, request: &packet::Request) -> Duration {
        let asked = request.options.iter().find(|(name, _)| name == "timeout");
        let timeout = asked
            .and_then(|(_, value)| value.parse::<u64>().ok())
            .filter(|seconds| (1..=255).contains(seconds))
            .map_or(self.timeout, Duration::from_secs);
        timeout * (self.unverified_retries.min(self.retries) + 2)
    }

    fn transfer(
        &self,
        request: packet::Request,
        socket: UdpSocket,
        claim: Option<Claim>,
    ) -> Box<dyn Flow> {
        let file = String::from_utf8_lossy(&request.filename).into_owned();
        let netascii = match request.mode.as_str() {
            "octet" => false,
            "netascii" => true,
            _ => {
                let common = self.common(socket, claim, file, "octet", String::new(), None);
                return refused(common, ErrorCode::IllegalOperation, "mode not supported", "bad-mode");
            }
        };
        let mode = if netascii { "netascii" } else { "octet" };
        let writing = request.opcode != RRQ;
        let common = |oack, options| self.common(socket, claim, file.clone(), mode, options, oack);
        if writing && !self.allow_write {
            return refused(
                common(None, String::new()),
                ErrorCode::AccessViolation,
                "write requests are not accepted",
                "write-refused",
            );
        }
        let target = if writing {
            upload::Upload::create(&self.root, &request.filename, self.create_mode)
                .map(Target::Upload)
        } else {
            open_beneath(&self.root, &request.filename).map(|(file, size)| Target::Read(file, size))
        };
        let target = match target {
            Ok(target) => target,
            Err((code, message, result)) => {
                return refused(common(None, String::new()), code, message, result);
            }
        };
        let size = match &target {
            Target::Read(_, size) => *size,
            Target::Upload(_) => 0,
        };
        // Options (RFC 2347): those understood and in range are acknowledged, possibly with
        // a smaller value; the others are ignored, as the RFC lets a server do.
        let mut blksize = DEFAULT_BLKSIZE;
        let mut windowsize = 1;
        let mut timeout = self.timeout;
        let mut acked: Vec<(String, String)> = Vec::new();
        for (name, value) in &request.options {
            let Ok(number) = value.parse::<u64>() else { continue };
            match name.as_str() {
                "blksize" if number >= 8 => {
                    blksize = (number as usize).min(self.max_blksize);
                    acked.push((name.clone(), blksize.to_string()));
                }
                "timeout" if (1..=255).contains(&number) => {
                    timeout = Duration::from_secs(number);
                    acked.push((name.clone(), number.to_string()));
                }
                // A read's size is the file's in octet mode; netascii's is not known ahead
                // (tftp-hpa does the same). An empty file's is left out: curl rejects
                // `tsize=0` in an OACK, and RFC 2347 lets a server leave out any option. A
                // write's announced size is checked against the limit now.
                "tsize" if !writing && !netascii && size > 0 => {
                    acked.push((name.clone(), size.to_string()));
                }
                "tsize" if writing => {
                    if number > self.max_write_size {
                        let (code, message) = (ErrorCode::DiskFull, "file too large");
                        return refused(common(None, String::new()), code, message, "too-large");
                    }
                    acked.push((name.clone(), number.to_string()));
                }
                "windowsize" if !writing && (1..=65535).contains(&number) => {
                    windowsize = number.min(self.max_windowsize);
                    acked.push((name.clone(), windowsize.to_string()));
                }
                _ => {}
            }
        }
        let summary: Vec<String> = acked.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let oack = (!acked.is_empty()).then(|| packet::oack(&acked));
        let mut common = common(oack, summary.join(","));
        common.timeout = timeout;
        match target {
            Target::Upload(upload) => Box::new(Write {
                common,
                upload,
                blksize,
                netascii: netascii.then_some(false),
                max_size: self.max_write_size,
                written: 0,
                acked: 0,
                finished: false,
                scratch: Vec::new(),
                packet: Vec::new(),
            }),
            Target::Read(file, _) => Box::new(Read::new(common, file, blksize, windowsize, netascii)),
        }
    }

    fn common(
        &self,
        socket: UdpSocket,
        claim: Option<Claim>,
        file: String,
        mode: &'static str,
        options: String,
        oack: Option<Vec<u8>>,
    ) -> Common {
        Common {
            socket,
            timeout: self.timeout,
            retries: self.retries,
            file,
            mode,
            options,
            oack,
            totals: Progress::default(),
            data: 0,
            blocks: 0,
            retransmissions: 0,
            tries: 0,
            busy_poll: self.busy_poll,
            peer: Peer::Unverified { retries: self.unverified_retries, claim },
        }
    }
}

/// What a request names: a file to read (and its size) or an upload to receive.
enum Target {
    Read(File, u64),
    Upload(upload::Upload),
}

fn refused(
    common: Common,
    code: ErrorCode,
    message: &str,
    result: &'static str,
) -> Box<dyn Flow> {
    Box::new(Refused { common, code, message: message.to_owned(), result })
}

/// Why a file cannot be served: the TFTP error, its message and the access-log result.
type OpenError = (ErrorCode, &'static str, &'static str);

/// The name relative to `root`: leading `/` removed (absolute names are taken relative to
/// the root); `None` for an empty name or one with a `..` component.
fn relative_name(name: &[u8]) -> Option<&[u8]> {
    let start = name.iter().position(|&b| b != b'/')?;
    let name = &name[start..];
    let escapes = name.split(|&b| b == b'/').any(|part| part == b"..");
    (!escapes).then_some(name)
}

fn how(flags: OFlag, mode: u32) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Refusal of a name that leaves `root`, a link, or anything but a regular file.
const VIOLATION: OpenError = (ErrorCode::AccessViolation, "access violation", "access-violation");

/// Opens `name` under `root` for reading. Returns the file and its size.
fn open_beneath(root: &std::path::Path, name: &[u8]) -> Result<(File, u64), OpenError> {
    let Some(relative) = relative_name(name) else { return Err(VIOLATION) };
    let root = root_dir(root)?;
    let relative = std::ffi::OsStr::from_bytes(relative);
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd: OwnedFd = openat2(&root, relative, how(flags, 0)).map_err(|errno| match errno {
        Errno::ENOENT => (ErrorCode::NotFound, "file not found", "not-found"),
        Errno::ENOTDIR => (ErrorCode::NotFound, "directory not found", "not-found"),
        Errno::ENOSYS => (ErrorCode::Undefined, "server cannot confine paths", "no-openat2"),
        // EXDEV: the path leaves root; ELOOP: a symlink loop; EACCES/EPERM.
        _ => VIOLATION,
    })?;
    let stat = fstat(&fd).map_err(|_| VIOLATION)?;
    let regular = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG;
    if !regular || stat.st_nlink > 1 {
        return Err(VIOLATION);
    }
    let file = File::from(fd);
    // Back to blocking reads (pread on a regular file never waits for a peer).
    let _ = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
    Ok((file, stat.st_size as u64))
}

use std::os::unix::ffi::OsStrExt;

/// A descriptor of `root` to resolve names beneath.
fn root_dir(root: &std::path::Path) -> Result<OwnedFd, OpenError> {
    nix::fcntl::open(root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|_| (ErrorCode::Undefined, "root directory unavailable", "no-root"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_taken_beneath_the_root() {
        assert_eq!(relative_name(b"/srv/a"), Some(&b"srv/a"[..]));
        assert_eq!(relative_name(b"a/b"), Some(&b"a/b"[..]));
        assert_eq!(relative_name(b"../etc/passwd"), None);
        assert_eq!(relative_name(b"a/../../b"), None);
        assert_eq!(relative_name(b"///"), None);
        assert_eq!(relative_name(b"a..b"), Some(&b"a..b"[..]), "only whole components");
    }

    #[test]
    fn confinement_refuses_escapes_and_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::fs::write(root.path().join("ok"), b"fine").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("out")).unwrap();
        std::os::unix::fs::symlink("ok", root.path().join("in")).unwrap();
        std::fs::hard_link(outside.path().join("secret"), root.path().join("hard")).unwrap();
        let r = root.path();
        assert_eq!(open_beneath(r, b"ok").unwrap().1, 4);
        assert_eq!(open_beneath(r, b"/ok").unwrap().1, 4, "absolute means under root");
        assert_eq!(open_beneath(r, b"in").unwrap().1, 4, "a link inside root is fine");
        assert_eq!(open_beneath(r, b"out").unwrap_err().0, ErrorCode::AccessViolation);
        assert_eq!(open_beneath(r, b"hard").unwrap_err().0, ErrorCode::AccessViolation);
        assert_eq!(open_beneath(r, b"missing").unwrap_err().0, ErrorCode::NotFound);
        assert_eq!(open_beneath(r, b".").unwrap_err().0, ErrorCode::AccessViolation);
        let escape = format!("../{}/secret", outside.path().file_name().unwrap().to_str().unwrap());
        assert_eq!(open_beneath(r, escape.as_bytes()).unwrap_err().0, ErrorCode::AccessViolation);
    }
}
