//! Reload (SIGHUP) by generation: build, validate, swap, drain.
//!
//! The whole file is read and validated first; on any problem the serving configuration is
//! left untouched and every problem is logged (and published on the scoreboard for
//! `preforkd reload`). Otherwise the listeners are prepared (an unchanged address keeps its
//! socket; a new one is bound; a bind failure rejects the reload), the generation is bumped
//! and its workers are forked. Only when all of them report ready on the scoreboard is the
//! old generation told to stop gracefully; if one fails to start, the reload is rolled back
//! and the old generation never stopped serving.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Master, Role, listener_id};
use crate::config::{self, Config};
use crate::listener::Listener;
use crate::logging;

/// How long a new generation has to report ready before the reload is rolled back.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What a rollback restores, kept while a reload's new generation starts.
pub(super) struct Previous {
    config: Config,
    listeners: Vec<Listener>,
    generation: u64,
}

impl Master {
    /// SIGHUP, as the supervisor decided: read, validate and start a new generation.
    pub(super) fn handle_reload(&mut self) {
        let path = self.invocation.config_path.clone();
        log::info!("reloading {}", path.display());
        let new = match config::load(&path, &self.invocation.services)
            .map_err(|e| e.to_string())
            .and_then(|c| self.checked(c))
        {
            Ok(new) => new,
            Err(reason) => return self.reload_failed(&reason),
        };
        let free = self.slots.iter().filter(|s| s.is_free()).count();
        let wanted = new.daemon.workers.get();
        if wanted > self.slots.len() / super::SLOT_HEADROOM {
            return self.reload_failed(&format!(
                "{wanted} workers need a restart: the shared tables were sized at start for {}",
                self.slots.len() / super::SLOT_HEADROOM
            ));
        }
        if free < wanted {
            return self.reload_failed(&format!(
                "{wanted} workers need {wanted} free slots, {free} are free while old generations drain; try again shortly"
            ));
        }
        let mut listeners = Vec::with_capacity(new.listeners.len());
        let mut reused = vec![false; self.listeners.len()];
        for config in &new.listeners {
            let id = listener_id(&mut self.listener_ids, &config.name);
            // The same name and address keeps its socket; so does a renamed listener on an
            // address nothing else took. A port-0 address only matches by name: two of them
            // are two different sockets.
            let same = |l: &Listener| {
                l.config.address == config.address && l.config.transport == config.transport
            };
            let by_name = (0..self.listeners.len()).find(|&i| {
                !reused[i]
                    && same(&self.listeners[i])
                    && self.listeners[i].config.name == config.name
            });
            let by_address = || {
                (0..self.listeners.len())
                    .find(|&i| !reused[i] && same(&self.listeners[i]) && config.address.port() != 0)
            };
            let prepared = match by_name.or_else(by_address) {
                Some(index) => {
                    reused[index] = true;
                    self.listeners[index].reuse(config, id)
                }
                None => Listener::bind(config, id).inspect(|listener| {
                    log::info!("listener {} now listening on {}", config.name, listener.local_addr);
                }),
            };
            match prepared {
                Ok(listener) => listeners.push(listener),
                Err(error) => return self.reload_failed(&error.to_string()),
            }
        }
        if new.log != self.config.log
            && let Err(error) = logging::apply(&new.log)
        {
            return self.reload_failed(&error.to_string());
        }
        self.previous = Some(Previous {
            config: std::mem::replace(&mut self.config, new),
            listeners: std::mem::replace(&mut self.listeners, listeners),
            generation: self.generation,
        });
        self.generation += 1;
        let now = Instant::now();
        self.supervisor.reload_started(self.generation, now + START_TIMEOUT);
        log::info!("generation {} starting: {wanted} workers", self.generation);
        for _ in 0..wanted {
            let Some(slot) = self.free_slot() else { break };
            self.slots[slot].serve(self.generation);
            if let Err(error) = self.spawn(slot, now) {
                self.slots[slot].role = Role::Free;
                return self.rollback(&format!("could not fork a worker: {error}"));
            }
        }
    }

    /// `new` if it can be applied by a reload: settings that size shared memory, name files or
    /// set process credentials cannot change without a restart.
    fn checked(&self, new: Config) -> Result<Config, String> {
        let restart = |key: &str| Err(format!("daemon.{key} cannot change without a restart"));
        let (old, fresh) = (&self.config.daemon, &new.daemon);
        if (&old.user, &old.group, old.allow_root_workers)
            != (&fresh.user, &fresh.group, fresh.allow_root_workers)
        {
            return restart("user, group or allow_root_workers");
        }
        if old.daemonize != fresh.daemonize || old.rlimit_nofile != fresh.rlimit_nofile {
            return restart("daemonize or rlimit_nofile");
        }
        self.restart_only_changes(&new)?;
        Ok(new)
    }

    /// Settings that size shared memory or name files cannot change without a restart.
    fn restart_only_changes(&self, new: &Config) -> Result<(), String> {
        let max = new.daemon.max_connections_per_worker.get();
        if max > self.per_slot {
            return Err(format!(
                "daemon.max_connections_per_worker can be at most {} without a restart (the shared limits table is sized at start), not {max}",
                self.per_slot
            ));
        }
        if new.daemon.pid_file != self.config.daemon.pid_file {
            return Err("daemon.pid_file cannot change without a restart".into());
        }
        Ok(())
    }

    /// Every worker of the new generation is ready: the old generation is told to stop.
    pub(super) fn complete_transition(&mut self, now: Instant) {
        let Some(previous) = self.previous.take() else { return };
        let old: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i].role == Role::Serving && self.slots[i].generation < self.generation
            })
            .collect();
        for &slot in &old {
            self.retire(slot, false, now);
        }
        // The old generation's listener copies close here; reused sockets stay open through
        // their duplicates, removed ones close once the old workers have drained.
        drop(previous);
        let header = self.scoreboard.header();
        header.generation.store(self.generation, Ordering::Relaxed);
        header.target_workers.store(self.serving_count() as u64, Ordering::Relaxed);
        header.reloads_ok.fetch_add(1, Ordering::Release);
        self.scoreboard.set_message("");
        log::info!(
            "reload complete: generation {} serving, {} old workers draining",
            self.generation,
            old.len()
        );
        let status = self.status_line();
        self.notifier.ready(&status);
        self.enforce_draining_cap(now, self.config.daemon.max_draining_generations.get());
        let queued = self.supervisor.reload_ended();
        self.perform(queued);
    }

    /// Undoes a starting reload: its workers are stopped fast and the previous generation
    /// keeps (or resumes) serving.
    pub(super) fn rollback(&mut self, reason: &str) {
        let Some(previous) = self.previous.take() else { return };
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            if self.slots[slot].role == Role::Serving
                && self.slots[slot].generation == self.generation
            {
                self.retire(slot, true, now);
            }
        }
        self.config = previous.config;
        self.listeners = previous.listeners;
        self.generation = previous.generation;
        if let Err(error) = logging::apply(&self.config.log) {
            log::error!("could not restore the log target: {error}");
        }
        self.fill_pool(now);
        self.reload_failed(&format!("rolled back: {reason}"));
        // A reload asked for meanwhile may carry the fix: the supervisor runs it now.
        let queued = self.supervisor.reload_ended();
        self.perform(queued);
    }

    /// Respawns, now, every serving slot of the serving generation that has no worker.
    pub(super) fn fill_pool(&mut self, now: Instant) {
        let target = self.config.daemon.workers.get();
        let mut serving = 0;
        for slot in 0..self.slots.len() {
            if self.slots[slot].role == Role::Serving
                && self.slots[slot].generation == self.generation
            {
                serving += 1;
                if self.slots[slot].pid.is_none() {
                    self.slots[slot].respawn_at = Some(now);
                }
            }
        }
        while serving < target {
            let Some(slot) = self.free_slot() else { break };
            self.slots[slot].serve(self.generation);
            self.slots[slot].respawn_at = Some(now);
            serving += 1;
        }
    }

    pub(super) fn reload_failed(&mut self, reason: &str) {
        for line in reason.lines() {
            log::error!("reload failed, still serving generation {}: {line}", self.generation);
        }
        self.scoreboard.set_message(reason);
        self.scoreboard.header().reloads_failed.fetch_add(1, Ordering::Release);
        let status = format!("{}; last reload failed", self.status_line());
        self.notifier.ready(&status);
    }

    /// Stops the oldest draining generations fast while more than `max` are draining.
    fn enforce_draining_cap(&mut self, now: Instant, max: usize) {
        loop {
            let mut draining: Vec<u64> = self
                .slots
                .iter()
                .filter(|s| matches!(s.role, Role::Retiring { fast: false, .. }) && s.pid.is_some())
                .filter(|s| s.generation < self.generation)
                .map(|s| s.generation)
                .collect();
            draining.sort_unstable();
            draining.dedup();
            if draining.len() <= max || self.supervisor.is_stopping() {
                return;
            }
            let oldest = draining[0];
            log::warn!(
                "{} generations draining, more than max_draining_generations: stopping generation {oldest} fast",
                draining.len()
            );
            for slot in 0..self.slots.len() {
                let entry = &self.slots[slot];
                if entry.generation == oldest
                    && matches!(entry.role, Role::Retiring { fast: false, .. })
                {
                    self.retire(slot, true, now);
                }
            }
        }
    }
}
