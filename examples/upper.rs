//! `upper`: a line protocol run by the whole preforkd daemon. Each line comes back in
//! capitals; `QUIT` ends the conversation, and so does a graceful stop of the daemon, with a
//! goodbye (a reload moves the connection instead). Options, in `[listener.options]`:
//! `greeting` (sent on connect; default none) and `max_line` (bytes, without the LF; default
//! 1024). It is built on [`Framed`] with the [`lines`] decoder: the helper does the
//! buffering, backpressure, the line limit and the hand-off.
//!
//! ```sh
//! cargo run --example upper -- -c examples/upper.toml
//! printf 'hello\nQUIT\n' | nc -N 127.0.0.1 7790
//! ```

use std::process::ExitCode;

use preforkd::services::framing::lines;
use preforkd::services::{ConnInfo, FrameAction, FrameHandler, Framed, Invalid, Options};
use preforkd::services::{Service, Session};

/// `[listener.options]` as written; unknown keys are errors in `preforkd check`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpperOptions {
    greeting: Option<String>,
    max_line: Option<usize>,
}

/// The service, built once per listener from its options.
struct Upper {
    greeting: Option<String>,
    max_line: usize,
}

impl Upper {
    fn from_options(options: &mut Options<'_>) -> Result<Upper, Invalid> {
        let UpperOptions { greeting, max_line } = options.parse()?;
        let max_line = max_line.unwrap_or(1024);
        if !(1..=65536).contains(&max_line) {
            options.report("max_line", format!("{max_line} is out of range: 1 to 65536"));
        }
        options.finish(Upper { greeting, max_line })
    }
}

impl Service for Upper {
    fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
        // A line is at most `max_line` bytes and its LF.
        let shout = Shout { greeting: self.greeting.clone() };
        Box::new(Framed::new(shout, lines, self.max_line + 1))
    }

    /// A connection handed over by a reload or an upgrade: `Framed` brings its buffers,
    /// and Shout keeps no state between lines (the greeting was sent already).
    fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let session = Framed::import(state, lines, self.max_line + 1, |own| {
            own.is_empty().then_some(Shout { greeting: None })
        })?;
        Some(Box::new(session))
    }
}

/// One connection's handler.
struct Shout {
    greeting: Option<String>,
}

impl FrameHandler for Shout {
    fn greeting(&mut self, out: &mut Vec<u8>) {
        if let Some(greeting) = self.greeting.take() {
            out.extend(greeting.into_bytes());
            out.extend(b"\r\n");
        }
    }

    fn on_frame(&mut self, line: &[u8], out: &mut Vec<u8>) -> FrameAction {
        if line == b"QUIT" {
            out.extend(b"BYE\r\n");
            return FrameAction::Close;
        }
        out.extend(line.to_ascii_uppercase());
        out.extend(b"\r\n");
        FrameAction::Continue
    }

    /// A last line the client ends with its FIN rather than an LF is answered too.
    fn on_end(&mut self, rest: &[u8], out: &mut Vec<u8>) {
        if !rest.is_empty() {
            self.on_frame(rest, out);
        }
    }

    /// Told when the worker keeps this connection while it drains: the daemon stops
    /// gracefully (a reload hands the connection off instead). Say so, and end.
    fn on_drain(&mut self, out: &mut Vec<u8>) -> FrameAction {
        out.extend(b"BYE server going away\r\n");
        FrameAction::Close
    }

    /// Between lines there is nothing to carry: the connection can be handed off.
    fn export(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}

fn main() -> ExitCode {
    preforkd::Daemon::new().service("upper", Upper::from_options).main()
}
