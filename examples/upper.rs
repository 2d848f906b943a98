//! `upper`: a line protocol run by the whole preforkd daemon. Each line comes back in
//! capitals; `QUIT` ends the conversation. Options, in `[listener.options]`:
//! `greeting` (sent on connect; default none) and `max_line` (bytes; default 1024).
//!
//! ```sh
//! cargo run --example upper -- -c examples/upper.toml
//! printf 'hello\nQUIT\n' | nc -N 127.0.0.1 7790
//! ```

use std::process::ExitCode;

use preforkd::services::{ConnInfo, Invalid, LineAction, LineHandler, Lines, Options};
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
        Box::new(Lines::new(Shout { greeting: self.greeting.clone() }, self.max_line))
    }

    /// A connection handed over by a reload or an upgrade: Shout keeps no state between
    /// lines (the greeting was sent already), so any handler state is empty.
    fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let session = Lines::import(state, self.max_line, |own| {
            own.is_empty().then_some(Shout { greeting: None })
        })?;
        Some(Box::new(session))
    }
}

/// One connection's handler.
struct Shout {
    greeting: Option<String>,
}

impl LineHandler for Shout {
    fn greeting(&mut self, out: &mut Vec<u8>) {
        if let Some(greeting) = self.greeting.take() {
            out.extend(greeting.into_bytes());
            out.extend(b"\r\n");
        }
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> LineAction {
        if line == b"QUIT" {
            out.extend(b"BYE\r\n");
            return LineAction::Close;
        }
        out.extend(line.to_ascii_uppercase());
        out.extend(b"\r\n");
        LineAction::Continue
    }

    /// Between lines there is nothing to carry: the connection can be handed off.
    fn export(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}

fn main() -> ExitCode {
    preforkd::Daemon::new().service("upper", Upper::from_options).main()
}
