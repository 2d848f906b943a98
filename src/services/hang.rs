//! `test-hang`: a service that wedges its worker, to test hung-worker detection. Only
//! enabled through [`super::TEST_SERVICES_ENV`].

use std::io;

use super::{Progress, Session, Transport};

/// Spins forever on the first readable event, like a worker stuck in a bug.
#[derive(Debug)]
pub struct Hang;

impl Session for Hang {
    fn wants_read(&self) -> bool {
        true
    }

    fn wants_write(&self) -> bool {
        false
    }

    fn on_readable(&mut self, _io: &mut dyn Transport) -> io::Result<Progress> {
        loop {
            std::hint::spin_loop();
        }
    }

    fn on_writable(&mut self, _io: &mut dyn Transport) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn is_at_rest(&self) -> bool {
        true
    }

    fn is_done(&self) -> bool {
        false
    }
}
