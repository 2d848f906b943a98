//! Reload (SIGHUP) by generation: build, validate, swap, drain.
//!
//! Runs in the master. The whole file is read and validated first; on any problem the serving
//! configuration is left untouched and every problem is logged (and published on the
//! scoreboard for `preforkd reload`). Otherwise the listeners are prepared (an unchanged
//! address keeps its socket, see [`reuse_plan`]; a new one is bound; a bind failure rejects
//! the reload), the generation is bumped and its workers are forked. Only when all of them
//! have said `Ready` on their channels is the old generation told to stop gracefully; if one
//! fails to start, the reload is rolled back and the old generation never stopped serving.
//!
//! The decisions are pure functions ([`restart_needed`], [`reuse_plan`]) and the pool's
//! (`pool.rs`), unit-tested; the methods here do the binding, forking and logging.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::pool::Stop;
use super::{FAST_STOP_GRACE, Master, listener_id};
use crate::config::{self, Config, ListenerConfig};
use crate::listener::Listener;
use crate::logging;

/// How long a new generation has to report ready before the reload is rolled back.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What a rollback restores, kept while a reload's new generation starts.
pub(super) struct Previous {
    config: Config,
    pub(super) listeners: Vec<Listener>,
    generation: u64,
}

/// Why `new` cannot replace `old` by a reload, if it cannot: settings that size shared
/// memory (`per_slot`: the per-client records each worker slot got at start), name files or
/// set process credentials need a restart.
///
/// # Errors
/// The first such setting that changed, as the message a failed reload logs.
pub fn restart_needed(old: &Config, new: &Config, per_slot: usize) -> Result<(), String> {
    let restart = |key: &str| Err(format!("daemon.{key} cannot change without a restart"));
    let (old, fresh) = (&old.daemon, &new.daemon);
    if (&old.user, &old.group, old.allow_root_workers)
        != (&fresh.user, &fresh.group, fresh.allow_root_workers)
    {
        return restart("user, group or allow_root_workers");
    }
    if old.daemonize != fresh.daemonize || old.rlimit_nofile != fresh.rlimit_nofile {
        return restart("daemonize or rlimit_nofile");
    }
    let max = fresh.max_connections_per_worker.get();
    if max > per_slot {
        return Err(format!(
            "daemon.max_connections_per_worker can be at most {per_slot} without a restart (the shared limits table is sized at start), not {max}"
        ));
    }
    if fresh.pid_file != old.pid_file {
        return restart("pid_file");
    }
    Ok(())
}

/// For each listener of `new`, the index in `old` of the listener whose socket it keeps, or
/// `None` to bind a new one. The same name, address and transport keeps its socket; so does
/// a renamed listener on an address nothing else took. A port-0 address only matches by
/// name: two of them are two different sockets. No old socket is kept twice.
pub fn reuse_plan(old: &[&ListenerConfig], new: &[ListenerConfig]) -> Vec<Option<usize>> {
    let mut reused = vec![false; old.len()];
    let mut plan = Vec::with_capacity(new.len());
    for config in new {
        let same = |i: usize| {
            !reused[i] && old[i].address == config.address && old[i].transport == config.transport
        };
        let by_name = (0..old.len()).find(|&i| same(i) && old[i].name == config.name);
        let by_address = || (0..old.len()).find(|&i| same(i) && !config.address.is_ephemeral());
        let chosen = by_name.or_else(by_address);
        if let Some(index) = chosen {
            reused[index] = true;
        }
        plan.push(chosen);
    }
    plan
}

impl Master {
    /// SIGHUP, as the supervisor decided: read, validate and start a new generation.
    pub(super) fn handle_reload(&mut self) {
        let path = self.invocation.config_path.clone();
        log::info!("reloading {}", path.display());
        let new = match config::load(&path, &self.invocation.services)
            .map_err(|e| e.to_string())
            .and_then(|new| restart_needed(&self.config, &new, self.per_slot).map(|()| new))
        {
            Ok(new) => new,
            Err(reason) => return self.reload_failed(&reason),
        };
        let exec = crate::spawner::findings(&new, nix::unistd::geteuid());
        for warning in &exec.warnings {
            log::warn!("{warning}");
        }
        if !exec.errors.is_empty() {
            return self.reload_failed(&exec.errors.join("\n"));
        }
        let wanted = new.daemon.workers.get();
        if let Err(no_room) = self.pool.room_for(wanted) {
            return self.reload_failed(&no_room.to_string());
        }
        let old: Vec<&ListenerConfig> = self.listeners.iter().map(|l| &l.config).collect();
        let plan = reuse_plan(&old, &new.listeners);
        let mut listeners = Vec::with_capacity(new.listeners.len());
        for (config, reuse) in new.listeners.iter().zip(plan) {
            let id = listener_id(&mut self.listener_ids, &config.name);
            let prepared = match reuse {
                Some(index) => self.listeners[index].reuse(config, id),
                None => Listener::bind(config, id).inspect(|listener| {
                    log::info!("listener {} now listening on {}", config.name, listener.local_addr);
                }),
            };
            match prepared {
                Ok(listener) => listeners.push(listener),
                Err(error) => return self.reload_failed(&error.to_string()),
            }
        }
        if let Err(error) = super::checkers::place(&self.scoreboard, &new, &self.listener_ids) {
            return self.reload_failed(&error.to_string());
        }
        if new.log != self.config.log
            && let Err(error) = logging::apply(&new.log)
        {
            return self.reload_failed(&error.to_string());
        }
        self.previous = Some(Previous {
            config: std::mem::replace(&mut self.config, new),
            listeners: std::mem::replace(&mut self.listeners, listeners),
            generation: self.pool.generation(),
        });
        // New ticket keys for the new generation (the previous ones still open what the
        // old one issued, unless a listener's client certificate policy changed).
        let tls = self.listeners.iter().map(|l| (l.id, l.config.tls.as_ref()));
        if let Err(error) = self.tickets.generation(tls, Instant::now()) {
            log::error!("TLS session-ticket keys: {error}; those listeners issue no tickets");
        }
        let (generation, slots) = self.pool.begin_generation(wanted);
        let now = Instant::now();
        self.supervisor.reload_started(generation, now + START_TIMEOUT);
        log::info!("generation {generation} starting: {wanted} workers");
        self.start_spawner(now);
        self.start_checker(now);
        for slot in slots {
            if let Err(error) = self.spawn(slot, now) {
                return self.rollback(&format!("could not fork a worker: {error}"));
            }
        }
    }

    /// Every worker of the new generation is ready: the old generation is told to stop.
    pub(super) fn complete_transition(&mut self, now: Instant) {
        let Some(previous) = self.previous.take() else { return };
        let (old, actions) = self.pool.retire_older(self.retire(), now);
        self.perform_pool(actions);
        // The old generation's listener copies close here; reused sockets stay open through
        // their duplicates, removed ones close once the old workers have drained. The socket
        // file of a Unix listener the reload removed goes now: no new client can reach it.
        for listener in &previous.listeners {
            if !self.listeners.iter().any(|kept| kept.local_addr == listener.local_addr) {
                listener.remove_file();
            }
        }
        drop(previous);
        self.retire_checkers(Some(self.pool.generation()));
        self.retire_rows();
        let header = self.scoreboard.header();
        header.generation.store(self.pool.generation(), Ordering::Relaxed);
        header.target_workers.store(self.serving_count() as u64, Ordering::Relaxed);
        header.reloads_ok.fetch_add(1, Ordering::Release);
        self.scoreboard.set_message("");
        log::info!(
            "reload complete: generation {} serving, {old} old workers draining",
            self.pool.generation()
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
        let target = previous.config.daemon.workers.get();
        let stop = Stop::Fast(FAST_STOP_GRACE);
        let actions = self.pool.roll_back(previous.generation, target, stop, now);
        self.perform_pool(actions);
        self.config = previous.config;
        self.listeners = previous.listeners;
        // The failed generation published its listeners' addresses when it forked: the
        // serving ones are where `status` must point again (a listener it moved is back).
        self.publish_listeners();
        self.retire_checkers(Some(self.pool.generation()));
        if let Err(error) = logging::apply(&self.config.log) {
            log::error!("could not restore the log target: {error}");
        }
        self.retire_spawners();
        self.reload_failed(&format!("rolled back: {reason}"));
        // A reload asked for meanwhile may carry the fix: the supervisor runs it now.
        let queued = self.supervisor.reload_ended();
        self.perform(queued);
    }

    /// Respawns, now, every serving slot of the serving generation that has no worker, and
    /// fills it up to `workers`.
    pub(super) fn fill_pool(&mut self, now: Instant) {
        self.pool.fill(self.config.daemon.workers.get(), now);
    }

    pub(super) fn reload_failed(&mut self, reason: &str) {
        let generation = self.pool.generation();
        for line in reason.lines() {
            log::error!("reload failed, still serving generation {generation}: {line}");
        }
        self.scoreboard.set_message(reason);
        self.scoreboard.header().reloads_failed.fetch_add(1, Ordering::Release);
        let status = format!("{}; last reload failed", self.status_line());
        self.notifier.ready(&status);
    }

    /// Stops the oldest draining generations fast while more than `max` are draining.
    fn enforce_draining_cap(&mut self, now: Instant, max: usize) {
        while !self.supervisor.is_stopping()
            && let Some((draining, oldest)) = self.pool.over_draining_cap(max)
        {
            log::warn!(
                "{draining} generations draining, more than max_draining_generations: stopping generation {oldest} fast"
            );
            let actions = self.pool.hurry(oldest, Stop::Fast(FAST_STOP_GRACE), now);
            self.perform_pool(actions);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::services::Registry;

    fn parse(source: &str) -> Config {
        config::parse(Path::new("t.toml"), source, &Registry::builtin()).expect("valid")
    }

    fn listener(name: &str, address: &str, transport: &str) -> String {
        format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"{address}\"\nservice = \"echo\"\ntransport = \"{transport}\"\n"
        )
    }

    fn plan(old: &[(&str, &str, &str)], new: &[(&str, &str, &str)]) -> Vec<Option<usize>> {
        let file = |set: &[(&str, &str, &str)]| {
            parse(&set.iter().map(|&(n, a, t)| listener(n, a, t)).collect::<String>())
        };
        let (old, new) = (file(old), file(new));
        let old: Vec<&ListenerConfig> = old.listeners.iter().collect();
        reuse_plan(&old, &new.listeners)
    }

    #[test]
    fn a_listener_keeps_its_socket_by_name_then_by_address() {
        let a = ("a", "127.0.0.1:7001", "tcp");
        let b = ("b", "127.0.0.1:7002", "tcp");
        assert_eq!(plan(&[a, b], &[b, a]), vec![Some(1), Some(0)], "by name");
        let renamed = ("c", "127.0.0.1:7002", "tcp");
        assert_eq!(plan(&[a, b], &[renamed]), vec![Some(1)], "renamed, same address");
        let moved = ("a", "127.0.0.1:7003", "tcp");
        assert_eq!(plan(&[a, b], &[moved]), vec![None], "a new address is bound");
        let udp = ("a", "127.0.0.1:7001", "udp");
        assert_eq!(plan(&[a], &[udp]), vec![None], "another transport is another socket");
        // Names swapped between two addresses: each socket stays on its address.
        let a2 = ("a", "127.0.0.1:7002", "tcp");
        let b2 = ("b", "127.0.0.1:7001", "tcp");
        assert_eq!(plan(&[a, b], &[a2, b2]), vec![Some(1), Some(0)], "by address");
    }

    #[test]
    fn port_zero_matches_by_name_only() {
        let a = ("a", "127.0.0.1:0", "tcp");
        let b = ("b", "127.0.0.1:0", "tcp");
        assert_eq!(plan(&[a, b], &[b, a]), vec![Some(1), Some(0)]);
        let c = ("c", "127.0.0.1:0", "tcp");
        assert_eq!(plan(&[a], &[c]), vec![None], "two port-0 listeners are two sockets");
    }

    #[test]
    fn settings_that_size_memory_name_files_or_set_credentials_need_a_restart() {
        let base = listener("a", "127.0.0.1:7001", "tcp");
        let with = |daemon: &str| {
            let size = if daemon.contains("max_connections") {
                ""
            } else {
                "max_connections_per_worker = 100"
            };
            parse(&format!("[daemon]\n{size}\n{daemon}\n{base}"))
        };
        let old = with("");
        let per_slot = 100;
        assert_eq!(restart_needed(&old, &with("workers = 4"), per_slot), Ok(()));
        let fewer = with("max_connections_per_worker = 50");
        assert_eq!(restart_needed(&old, &fewer, per_slot), Ok(()));
        let more = with("max_connections_per_worker = 101");
        let error = restart_needed(&old, &more, per_slot).unwrap_err();
        assert!(error.contains("at most 100 without a restart"), "{error}");
        for (daemon, key) in [
            ("user = \"nobody\"", "user, group or allow_root_workers"),
            ("allow_root_workers = true", "user, group or allow_root_workers"),
            ("rlimit_nofile = 4096", "daemonize or rlimit_nofile"),
            ("pid_file = \"/run/p.pid\"", "pid_file"),
        ] {
            let error = restart_needed(&old, &with(daemon), per_slot).unwrap_err();
            assert_eq!(error, format!("daemon.{key} cannot change without a restart"), "{daemon}");
        }
    }
}
