//! Session-ticket keys shared by every worker, so that a client resumes (RFC 8446 section
//! 2.2, RFC 5077) on whichever worker accepts its next connection.
//!
//! The master makes the region ([`TicketKeys::create`], an anonymous `MAP_SHARED` mapping,
//! kept out of core dumps) before it forks anything, fills each TLS listener's row from the
//! OS random generator (through aws-lc's), and replaces the key on a schedule and at each
//! reload ([`TicketKeys::rotate`]); workers inherit the mapping and only read it. A row holds
//! the current key, which seals new tickets, and the previous one, which still opens the
//! tickets it sealed: a ticket is accepted for between one and two rotation periods.
//!
//! Rows are indexed by the listener's stable id (as the scoreboard's are), so listeners never
//! share keys: a ticket issued on one listener (after its client certificate check) cannot
//! resume on another. There is a row for every id a listener can have ([`TICKET_ROWS`], the
//! whole `u16` range; the scoreboard's per-listener counters stop at its `LISTENER_ROWS`, the
//! keys do not): the region is reserved, not committed, so only the rows of listeners that
//! issue tickets take memory. Each row is written under a sequence count (odd while the master
//! writes), and readers copy a key only from a stable, even count.
//!
//! A ticket is `key name (16) | nonce (12) | AES-256-GCM(state) | tag (16)`, the key name as
//! additional data: the AEAD is aws-lc's, the nonce random (at most one rotation's tickets
//! per key, far below the 2^32 that random 96-bit nonces allow).

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous};
use rustls::server::ProducesTickets;

/// Rows of the region: one per possible listener id (ids are `u16`).
pub const TICKET_ROWS: usize = 1 << 16;

/// Bytes of a key's name, the first bytes of every ticket it seals.
const NAME_LEN: usize = 16;
/// Bytes of a key's secret (AES-256).
const SECRET_LEN: usize = 32;
/// Words of one key in a row: name, then secret.
const KEY_WORDS: usize = (NAME_LEN + SECRET_LEN) / 8;
/// AES-GCM's tag.
const TAG_LEN: usize = 16;

/// One listener's keys.
#[repr(C)]
struct Row {
    /// Odd while the master writes the row.
    sequence: AtomicU64,
    /// Current key, then previous key; a key of all zeros is none.
    words: [AtomicU64; 2 * KEY_WORDS],
}

/// A key: its name and secret.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    name: [u8; NAME_LEN],
    secret: [u8; SECRET_LEN],
}

impl Key {
    fn from_words(words: &[u64]) -> Option<Key> {
        let mut bytes = [0u8; NAME_LEN + SECRET_LEN];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        if bytes.iter().all(|&b| b == 0) {
            return None;
        }
        let mut key = Key { name: [0; NAME_LEN], secret: [0; SECRET_LEN] };
        key.name.copy_from_slice(&bytes[..NAME_LEN]);
        key.secret.copy_from_slice(&bytes[NAME_LEN..]);
        Some(key)
    }

    fn words(&self) -> [u64; KEY_WORDS] {
        let mut bytes = [0u8; NAME_LEN + SECRET_LEN];
        bytes[..NAME_LEN].copy_from_slice(&self.name);
        bytes[NAME_LEN..].copy_from_slice(&self.secret);
        let mut words = [0u64; KEY_WORDS];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        words
    }

    fn aead(&self) -> Option<LessSafeKey> {
        UnboundKey::new(&AES_256_GCM, &self.secret).ok().map(LessSafeKey::new)
    }
}

/// The shared ticket-key region: a handle that copies freely (the mapping lives as long as
/// the process; it is never unmapped).
#[derive(Clone, Copy)]
pub struct TicketKeys {
    rows: NonNull<Row>,
}

// SAFETY: the region is only accessed through atomics, and is never unmapped.
unsafe impl Send for TicketKeys {}
// SAFETY: as above.
unsafe impl Sync for TicketKeys {}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKeys { .. }")
    }
}

impl TicketKeys {
    /// Maps the region, every row empty (by the master, at start, before it forks).
    ///
    /// # Errors
    /// mmap(2) failed.
    pub fn create() -> io::Result<TicketKeys> {
        let len =
            NonZeroUsize::new(std::mem::size_of::<Row>() * TICKET_ROWS).expect("rows have a size");
        // SAFETY: a fresh anonymous mapping, zero-filled (all-zero atomics are valid rows).
        // No swap is reserved for it (a few MiB, of which only the rows of TLS listeners are
        // ever touched).
        let region = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
            )
        }?;
        // SAFETY: the range is the mapping just made. Best effort: a core dump of the master
        // or a worker then holds no key.
        let _ = unsafe { madvise(region, len.get(), MmapAdvise::MADV_DONTDUMP) };
        Ok(TicketKeys { rows: region.cast() })
    }

    fn row(&self, id: usize) -> Option<&Row> {
        // SAFETY: in bounds of the mapping, which lives as long as the process.
        (id < TICKET_ROWS).then(|| unsafe { &*self.rows.as_ptr().add(id) })
    }

    /// Gives listener `id` a new current key from the OS random generator (by the master):
    /// the old current key becomes the previous one with `keep_previous`, else both are
    /// replaced (no ticket sealed before opens any more). Ids past [`TICKET_ROWS`] (none a
    /// listener can have) have no row and are ignored.
    ///
    /// # Errors
    /// The random generator failed (the row is left as it was).
    pub fn rotate(&self, id: usize, keep_previous: bool) -> io::Result<()> {
        let Some(row) = self.row(id) else { return Ok(()) };
        let mut fresh = Key { name: [0; NAME_LEN], secret: [0; SECRET_LEN] };
        let random = SystemRandom::new();
        random
            .fill(&mut fresh.name)
            .and_then(|()| random.fill(&mut fresh.secret))
            .map_err(|_| io::Error::other("the random generator failed"))?;
        let current: Vec<u64> =
            row.words[..KEY_WORDS].iter().map(|w| w.load(Ordering::Relaxed)).collect();
        row.sequence.fetch_add(1, Ordering::AcqRel);
        for (word, value) in row.words[KEY_WORDS..].iter().zip(&current) {
            word.store(if keep_previous { *value } else { 0 }, Ordering::Relaxed);
        }
        for (word, value) in row.words[..KEY_WORDS].iter().zip(fresh.words()) {
            word.store(value, Ordering::Relaxed);
        }
        row.sequence.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Forgets listener `id`'s keys (a listener that no longer issues tickets).
    pub fn clear(&self, id: usize) {
        let Some(row) = self.row(id) else { return };
        row.sequence.fetch_add(1, Ordering::AcqRel);
        for word in &row.words {
            word.store(0, Ordering::Relaxed);
        }
        row.sequence.fetch_add(1, Ordering::AcqRel);
    }

    /// Listener `id`'s (current, previous) keys, as one consistent copy.
    fn read(&self, id: usize) -> (Option<Key>, Option<Key>) {
        let Some(row) = self.row(id) else { return (None, None) };
        let mut words = [0u64; 2 * KEY_WORDS];
        for _ in 0..1000 {
            let before = row.sequence.load(Ordering::Acquire);
            for (value, word) in words.iter_mut().zip(&row.words) {
                *value = word.load(Ordering::Relaxed);
            }
            std::sync::atomic::fence(Ordering::Acquire);
            if before.is_multiple_of(2) && before == row.sequence.load(Ordering::Relaxed) {
                break;
            }
            std::hint::spin_loop();
        }
        (Key::from_words(&words[..KEY_WORDS]), Key::from_words(&words[KEY_WORDS..]))
    }

    /// The ticketer of listener `id` for rustls, which seals with the row's current key and
    /// opens with the current or previous one; `lifetime` is the validity a client is told
    /// (one rotation period). `None` for an id past [`TICKET_ROWS`] (none a listener can
    /// have).
    pub fn ticketer(&self, id: usize, lifetime: Duration) -> Option<SharedTicketer> {
        self.row(id)?;
        let lifetime = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        Some(SharedTicketer { keys: *self, id, lifetime, random: SystemRandom::new() })
    }
}

/// The master's schedule of key rotations: one entry per TLS listener that issues tickets,
/// by listener id.
///
/// Runs in the master; the decisions are pure (time passed in), the writes go to the shared
/// [`TicketKeys`].
#[derive(Debug)]
pub struct Rotation {
    keys: TicketKeys,
    /// Listener id -> when its key is replaced next, how often, and the TLS configuration
    /// its tickets were issued under.
    rows: std::collections::HashMap<u16, Scheduled>,
}

#[derive(Debug)]
struct Scheduled {
    next: std::time::Instant,
    every: Duration,
    config: super::TlsConfig,
}

impl Rotation {
    /// No listener yet, over `keys`.
    pub fn new(keys: TicketKeys) -> Self {
        Rotation { keys, rows: std::collections::HashMap::new() }
    }

    /// The shared keys, for the workers.
    pub fn keys(&self) -> TicketKeys {
        self.keys
    }

    /// A generation starts (at start, at each reload) with `listeners`, `(id, TLS
    /// configuration)`: each one that issues tickets gets a new key, keeping the previous
    /// one (tickets of the serving generation still open) unless its client certificate
    /// policy changed, so that no client authenticated under the old policy resumes under
    /// the new one; the others' keys are forgotten.
    ///
    /// # Errors
    /// The random generator failed: the listener issues no ticket the master did not make
    /// (its row is cleared).
    pub fn generation<'c>(
        &mut self,
        listeners: impl IntoIterator<Item = (u16, Option<&'c super::TlsConfig>)>,
        now: std::time::Instant,
    ) -> io::Result<()> {
        let mut kept = std::collections::HashMap::new();
        let mut failed = Ok(());
        for (id, tls) in listeners {
            let Some(tls) = tls.filter(|tls| tls.spec.session_tickets) else { continue };
            let keep = self.rows.get(&id).is_some_and(|old| !old.config.client_policy_differs(tls));
            if let Err(error) = self.keys.rotate(usize::from(id), keep) {
                self.keys.clear(usize::from(id));
                failed = Err(error);
                continue;
            }
            let every = tls.spec.ticket_rotation;
            kept.insert(id, Scheduled { next: now + every, every, config: tls.clone() });
        }
        for id in self.rows.keys().filter(|id| !kept.contains_key(id)) {
            self.keys.clear(usize::from(*id));
        }
        self.rows = kept;
        failed
    }

    /// When the next rotation is due.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.rows.values().map(|row| row.next).min()
    }

    /// Rotates every key due at `now`, keeping the previous one.
    ///
    /// # Errors
    /// The random generator failed (the key stays; tried again at the next period).
    pub fn tick(&mut self, now: std::time::Instant) -> io::Result<()> {
        let mut result = Ok(());
        for (id, row) in &mut self.rows {
            if row.next <= now {
                row.next = now + row.every;
                if let Err(error) = self.keys.rotate(usize::from(*id), true) {
                    result = Err(error);
                }
            }
        }
        result
    }
}

/// rustls's [`ProducesTickets`] over one listener's row of [`TicketKeys`].
pub struct SharedTicketer {
    keys: TicketKeys,
    id: usize,
    lifetime: u32,
    random: SystemRandom,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer").field("listener", &self.id).finish_non_exhaustive()
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (Some(key), _) = self.keys.read(self.id) else { return None };
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let aead = key.aead()?;
        let sealed = &mut ticket[NAME_LEN + NONCE_LEN..];
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                sealed,
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (current, previous) = self.keys.read(self.id);
        let key = [current, previous].into_iter().flatten().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = sealed.to_vec();
        let plain = key.aead()?.open_in_place(nonce, Aad::from(&key.name), &mut buffer).ok()?;
        let len = plain.len();
        buffer.truncate(len);
        Some(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_open_under_the_current_and_previous_key_only() {
        let keys = TicketKeys::create().unwrap();
        let hour = Duration::from_secs(3600);
        let ticketer = keys.ticketer(3, hour).unwrap();
        assert_eq!(ticketer.encrypt(b"state"), None, "no key yet: no ticket");
        keys.rotate(3, true).unwrap();
        let first = ticketer.encrypt(b"session state").unwrap();
        assert_eq!(first.len(), NAME_LEN + NONCE_LEN + 13 + TAG_LEN);
        assert_eq!(ticketer.decrypt(&first).unwrap(), b"session state");
        // Another worker's ticketer (the same row) opens it too.
        assert_eq!(keys.ticketer(3, hour).unwrap().decrypt(&first).unwrap(), b"session state");
        assert_eq!(keys.ticketer(4, hour).unwrap().decrypt(&first), None, "another listener");
        keys.rotate(3, true).unwrap();
        assert_eq!(ticketer.decrypt(&first).unwrap(), b"session state", "previous key");
        let second = ticketer.encrypt(b"later").unwrap();
        assert_ne!(first[..NAME_LEN], second[..NAME_LEN], "sealed under the new key");
        keys.rotate(3, true).unwrap();
        assert_eq!(ticketer.decrypt(&first), None, "two rotations later");
        assert_eq!(ticketer.decrypt(&second).unwrap(), b"later");
        keys.rotate(3, false).unwrap();
        assert_eq!(ticketer.decrypt(&second), None, "a rotation without the previous key");
        let mut forged = ticketer.encrypt(b"x").unwrap();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(ticketer.decrypt(&forged), None, "a tampered ticket");
        assert_eq!(ticketer.decrypt(&forged[..20]), None, "a short one");
        keys.clear(3);
        assert_eq!(ticketer.encrypt(b"x"), None);
        // Every listener id has its row, past the scoreboard's 64 per-listener rows too.
        for id in [crate::scoreboard::LISTENER_ROWS, usize::from(u16::MAX)] {
            keys.rotate(id, false).unwrap();
            let sealed = keys.ticketer(id, hour).unwrap().encrypt(b"far").unwrap();
            let other_worker = keys.ticketer(id, hour).unwrap();
            assert_eq!(other_worker.decrypt(&sealed).unwrap(), b"far", "listener {id}");
        }
        assert!(keys.ticketer(TICKET_ROWS, hour).is_none());
        assert_eq!(ticketer.lifetime(), 3600);
    }
}
