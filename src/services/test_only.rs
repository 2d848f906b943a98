//! Services for tests only, enabled by [`super::TEST_SERVICES_ENV`] and never listed:
//! - `test-hang` wedges its worker, to test hung-worker detection;
//! - `test-probe` uses every part of the session API a built-in does not: an extra
//!   descriptor (a pipe) watched through the loop, a timer, and a close reason of its own;
//! - `test-sticky` echoes each line but refuses hand-off (its session keeps the default
//!   [`Session::export`]), so its connections finish in the worker that accepted them;
//! - `test-hooks` echoes lines and records its worker hooks: in `[listener.options]`, `dir`
//!   gets a file `after_fork-PID` (`slot=S generation=G listener=NAME uid=U`) from
//!   [`Service::after_fork`] and `before_exit-PID` (`graceful`, `fast` or `failed`) from
//!   [`Service::before_exit`]; `after_fork` fails while the file `fail_if` exists. Its
//!   sessions are never handed off, and answer the drain notice ([`Session::on_drain`]) with
//!   the line `draining`.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::framing::{FrameAction, FrameHandler, Framed, lines};
use super::{
    CloseReason, ConnInfo, Context, HookError, Interest, Invalid, Options, Progress, Ready,
    Service, Session, WorkerInfo, WorkerStop, write_some,
};

/// Builds the test-only service `name`, if it is one.
pub(super) fn build(
    name: &str,
    options: &mut Options<'_>,
) -> Option<Result<Arc<dyn Service>, Invalid>> {
    match name {
        "test-hang" => Some(options.expect_none(name).map(|()| Arc::new(Hang) as Arc<dyn Service>)),
        "test-probe" => {
            Some(options.expect_none(name).map(|()| Arc::new(Probe) as Arc<dyn Service>))
        }
        "test-sticky" => {
            Some(options.expect_none(name).map(|()| Arc::new(Sticky) as Arc<dyn Service>))
        }
        "test-hooks" => Some(Hooks::build(options).map(|h| Arc::new(h) as Arc<dyn Service>)),
        _ => None,
    }
}

/// Echoes lines and records its worker hooks in files (see the module documentation).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Hooks {
    dir: PathBuf,
    fail_if: Option<PathBuf>,
}

impl Hooks {
    fn build(options: &mut Options<'_>) -> Result<Hooks, Invalid> {
        let hooks = options.parse::<Hooks>()?;
        options.finish(hooks)
    }

    fn record(&self, hook: &str, text: &str) -> io::Result<()> {
        std::fs::write(self.dir.join(format!("{hook}-{}", std::process::id())), text)
    }
}

impl Service for Hooks {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(Framed::new(Goodbye, lines, 4096))
    }

    fn after_fork(&self, worker: &WorkerInfo<'_>) -> Result<(), HookError> {
        if let Some(fail_if) = self.fail_if.as_ref().filter(|path| path.exists()) {
            return Err(format!("{} exists", fail_if.display()).into());
        }
        let WorkerInfo { slot, generation, listener, .. } = *worker;
        let uid = nix::unistd::geteuid();
        let text = format!("slot={slot} generation={generation} listener={listener} uid={uid}");
        Ok(self.record("after_fork", &text)?)
    }

    fn before_exit(&self, _worker: &WorkerInfo<'_>, stop: WorkerStop) {
        let word = match stop {
            WorkerStop::Graceful => "graceful",
            WorkerStop::Fast => "fast",
            WorkerStop::Failed => "failed",
        };
        let _ = self.record("before_exit", word);
    }
}

/// Echoes lines; never handed off (neither [`FrameHandler::export`] nor
/// [`Service::import`]).
#[derive(Debug)]
struct Sticky;

impl Service for Sticky {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(Framed::new(Sticky, lines, 4096))
    }
}

impl FrameHandler for Sticky {
    fn on_frame(&mut self, line: &[u8], out: &mut Vec<u8>) -> FrameAction {
        out.extend_from_slice(line);
        out.push(b'\n');
        FrameAction::Continue
    }
}

/// Echoes lines, and says `draining` when told the worker keeps it while draining.
struct Goodbye;

impl FrameHandler for Goodbye {
    fn on_frame(&mut self, line: &[u8], out: &mut Vec<u8>) -> FrameAction {
        Sticky.on_frame(line, out)
    }

    fn on_drain(&mut self, out: &mut Vec<u8>) -> FrameAction {
        out.extend_from_slice(b"draining\n");
        FrameAction::Continue
    }
}

/// Spins forever on the first readable event, like a worker stuck in a bug.
#[derive(Debug)]
struct Hang;

impl Service for Hang {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(Hang)
    }
}

impl Session for Hang {
    fn interest(&self) -> Interest {
        Interest::READ
    }

    fn on_readable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        loop {
            std::hint::spin_loop();
        }
    }

    fn on_writable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn is_at_rest(&self) -> bool {
        true
    }

    fn is_done(&self) -> bool {
        false
    }
}

/// Speaks first: opens a pipe, writes a byte into it and watches its read end; when the
/// loop reports it readable, sets a 50 ms timer; when that fires, sends `probe: pipe, timer`
/// and closes with reason `probe-done`.
#[derive(Debug)]
struct Probe;

impl Service for Probe {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(ProbeSession { pipe: None, step: Step::Start, sent: 0 })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Start,
    Piped,
    Timed,
    Answer,
}

struct ProbeSession {
    pipe: Option<(OwnedFd, OwnedFd)>,
    step: Step,
    sent: usize,
}

const ANSWER: &[u8] = b"probe: pipe, timer\n";

impl Session for ProbeSession {
    fn interest(&self) -> Interest {
        match self.step {
            Step::Start | Step::Answer => Interest::WRITE,
            Step::Piped | Step::Timed => Interest::NONE,
        }
    }

    fn on_readable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.step {
            Step::Start => {
                let (read, write) = nix::unistd::pipe()?;
                nix::fcntl::fcntl(
                    &read,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                )?;
                nix::unistd::write(&write, b"x")?;
                cx.watch(read.as_fd(), Interest::READ)?;
                self.pipe = Some((read, write));
                self.step = Step::Piped;
                Ok(Progress::default())
            }
            Step::Answer => {
                let n = write_some(cx, &ANSWER[self.sent..])?;
                self.sent += n;
                if self.sent == ANSWER.len() {
                    cx.close(CloseReason::Service("probe-done"));
                }
                Ok(Progress { bytes_out: n as u64, exchanges: 1, ..Progress::default() })
            }
            _ => Ok(Progress::default()),
        }
    }

    fn on_extra(&mut self, _fd: RawFd, ready: Ready, cx: &mut Context<'_>) -> io::Result<Progress> {
        let Some((read, write)) = self.pipe.take() else { return Ok(Progress::default()) };
        let mut byte = [0u8; 1];
        if !ready.readable || nix::unistd::read(&read, &mut byte) != Ok(1) {
            self.pipe = Some((read, write)); // spurious: wait for the next readiness
            return Ok(Progress::default());
        }
        cx.unwatch(read.as_fd());
        drop((read, write));
        cx.set_timer(Some(cx.now() + Duration::from_millis(50)));
        self.step = Step::Timed;
        Ok(Progress { bytes_in: 1, ..Progress::default() })
    }

    fn on_timer(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        self.step = Step::Answer;
        Ok(Progress::default())
    }

    fn is_at_rest(&self) -> bool {
        self.step == Step::Start
    }

    fn is_done(&self) -> bool {
        false
    }
}
