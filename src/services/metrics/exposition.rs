//! The scoreboard as Prometheus metrics: read once per scrape into a fresh
//! `prometheus_client` registry, encoded as OpenMetrics 1.0.0 text, or rewritten into the
//! Prometheus text format 0.0.4 for clients that do not ask for OpenMetrics.
//!
//! Runs in workers (a `metrics` session), over the scoreboard they map. Every metric is
//! named and described here only; man/preforkd.toml.5 lists them (a test checks it names
//! every one). The crate writes OpenMetrics only; the two formats differ, for what is
//! written here, in the counter's name on its `# HELP` and `# TYPE` lines (OpenMetrics names
//! the family, `x`, and its sample `x_total`; text 0.0.4 names both `x_total`) and in the
//! `# UNIT` and `# EOF` lines, which 0.0.4 does not have: [`to_text_004`] does exactly that.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::clock::monotonic_ms;
use crate::scoreboard::{
    Close, Datagram, Refusal, Scoreboard, SlotState, TlsFailure, UpgradeState,
};

/// Every metric's name starts with this and `_`.
pub const PREFIX: &str = "preforkd";

/// The `Content-Type` of the text format 0.0.4.
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics 1.0.0 text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// The metrics of `board` now, in OpenMetrics text (`openmetrics`) or text 0.0.4.
pub fn render(board: &Scoreboard, openmetrics: bool) -> String {
    let registry = collect(board, monotonic_ms());
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    if openmetrics { out } else { to_text_004(&out) }
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(saturating(value));
    registry.register(name, help, gauge);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let counter = Counter::<u64>::default();
    counter.inc_by(value);
    registry.register(name, help, counter);
}

fn counters(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
        None => registry.register(name, help, family.clone()),
    }
    family
}

fn gauges(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// A registry holding the values of `board` at `now_ms` (`CLOCK_MONOTONIC` milliseconds).
fn collect(board: &Scoreboard, now_ms: u64) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let r = &mut registry;
    let header = board.header();
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);

    // The master.
    gauge(r, "generation", "Configuration generation serving now, from 1", load(&header.generation));
    gauge(r, "target_workers", "Workers the serving generation is to run", load(&header.target_workers));
    let start = Gauge::<f64, AtomicU64>::default();
    start.set(load(&header.started_unix_ms) as f64 / 1000.0);
    r.register_with_unit("master_start_time", "When the master started, Unix time", Unit::Seconds, start);
    let reloads = counters(r, "reloads", "Reloads (SIGHUP) by result: applied, or rejected or rolled back", None);
    reloads.get_or_create(&vec![("result", "applied".into())]).inc_by(load(&header.reloads_ok));
    reloads.get_or_create(&vec![("result", "rejected".into())]).inc_by(load(&header.reloads_failed));
    counter(
        r,
        "worker_restarts",
        "Workers that exited without being asked to while their generation served, then forked again",
        load(&header.worker_restarts),
    );
    counter(
        r,
        "worker_recycles",
        "Workers replaced because they asked to be (recycle_after_connections, recycle_above_rss)",
        u64::from(header.worker_recycles.load(Ordering::Relaxed)),
    );
    let upgrade = gauges(r, "upgrade_state", "Binary upgrade state: 1 for the current state, 0 for the others");
    let current = header.upgrade_state();
    for state in UpgradeState::ALL {
        upgrade.get_or_create(&vec![("state", state.name().into())]).set(i64::from(state == current));
    }
    counter(r, "upgrades_failed", "Binary upgrades whose new master exited", load(&header.upgrades_failed));
    counter(
        r,
        "log_lines_dropped",
        "Log lines that could not be written, by the master and every worker",
        load(&header.log_lines_dropped),
    );

    // Each listener.
    let open = gauges(r, "listener_open_connections", "Connections open now, by listener");
    let accepted = counters(r, "listener_accepted_connections", "Connections accepted and served, by listener", None);
    let refused = counters(
        r,
        "listener_refused_connections",
        "Connections refused or shed, by listener and reason",
        None,
    );
    let closed = counters(r, "listener_closed_connections", "Connections closed, by listener and reason", None);
    let received = counters(r, "listener_received", "Bytes read from clients, by listener", Some(Unit::Bytes));
    let sent = counters(r, "listener_sent", "Bytes written to clients, by listener", Some(Unit::Bytes));
    let handoffs = counters(
        r,
        "listener_handoffs",
        "Connections handed between workers on reload or upgrade, by listener and direction (out: handed off by a retiring worker; in: adopted)",
        None,
    );
    let datagrams = counters(
        r,
        "listener_datagrams",
        "Datagrams received on a UDP listener's socket, by listener and outcome",
        None,
    );
    let handshakes = counters(
        r,
        "listener_tls_handshakes",
        "TLS handshakes completed, by listener and kind (full, or resumed from a ticket)",
        None,
    );
    let tls_failed = counters(r, "listener_tls_failures", "TLS handshakes failed, by listener and reason", None);
    for totals in board.listener_totals() {
        let name = || vec![("listener", totals.name.clone())];
        let with_reason = |reason: &str| vec![("listener", totals.name.clone()), ("reason", reason.to_owned())];
        open.get_or_create(&name()).set(saturating(totals.open));
        accepted.get_or_create(&name()).inc_by(totals.accepted);
        received.get_or_create(&name()).inc_by(totals.bytes_in);
        sent.get_or_create(&name()).inc_by(totals.bytes_out);
        let direction = |way: &str| vec![("listener", totals.name.clone()), ("direction", way.to_owned())];
        handoffs.get_or_create(&direction("out")).inc_by(totals.handed_off);
        handoffs.get_or_create(&direction("in")).inc_by(totals.adopted);
        for reason in Refusal::ALL {
            refused.get_or_create(&with_reason(reason.name())).inc_by(totals.refused(reason));
        }
        for reason in Close::ALL {
            closed.get_or_create(&with_reason(reason.name())).inc_by(totals.closed[reason as usize]);
        }
        for outcome in Datagram::ALL {
            let labels = vec![("listener", totals.name.clone()), ("outcome", outcome.name().to_owned())];
            datagrams.get_or_create(&labels).inc_by(totals.datagrams(outcome));
        }
        let failures: u64 = totals.tls_failed.iter().sum();
        if totals.tls_handshakes + failures > 0 {
            let kind = |kind: &str| vec![("listener", totals.name.clone()), ("kind", kind.to_owned())];
            handshakes.get_or_create(&kind("full")).inc_by(totals.tls_handshakes - totals.tls_resumed);
            handshakes.get_or_create(&kind("resumed")).inc_by(totals.tls_resumed);
            for reason in TlsFailure::ALL {
                tls_failed.get_or_create(&with_reason(reason.name())).inc_by(totals.tls_failed(reason));
            }
        }
    }

    // Each backend address of the relay listeners, named as HAProxy's exporter names its
    // servers (haproxy_server_*).
    let names: Vec<String> = board.listener_totals().into_iter().map(|t| t.name).collect();
    let status = gauges(r, "backend_status", "Backend state: 1 for the current state (UP: new connections may go to it; DOWN), 0 for the other");
    let current = gauges(r, "backend_current_sessions", "Connections to the backend open now, over every worker");
    let limit = gauges(r, "backend_limit_sessions", "The backend's max_connections; 0 for no cap");
    let weight = gauges(r, "backend_weight", "The backend's weight");
    let sessions = counters(r, "backend_sessions", "Connects to the backend that succeeded", None);
    let errors = counters(r, "backend_connection_errors", "Connects to the backend that failed (refused, timed out)", None);
    let bytes_in = counters(r, "backend_bytes_in", "Bytes relayed from clients to the backend", None);
    let bytes_out = counters(r, "backend_bytes_out", "Bytes relayed from the backend to clients", None);
    let check_failures = counters(r, "backend_check_failures", "Active health checks of the backend that failed", None);
    let check_duration = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    r.register_with_unit(
        "backend_check_duration",
        "How long the backend's last health check took",
        Unit::Seconds,
        check_duration.clone(),
    );
    let last_check = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    r.register_with_unit(
        "backend_last_check_time",
        "When the backend's last health check ended, Unix time; 0 if never",
        Unit::Seconds,
        last_check.clone(),
    );
    for view in board.backends().views() {
        let listener = names.get(usize::from(view.listener)).cloned().unwrap_or_default();
        let address = view.address.as_ref().map(ToString::to_string).unwrap_or_default();
        let labels = || {
            vec![("listener", listener.clone()), ("backend", view.name.clone()), ("address", address.clone())]
        };
        for (state, on) in [("UP", view.up), ("DOWN", !view.up)] {
            let mut with_state = labels();
            with_state.push(("state", state.to_owned()));
            status.get_or_create(&with_state).set(i64::from(on));
        }
        current.get_or_create(&labels()).set(saturating(view.active));
        limit.get_or_create(&labels()).set(i64::from(view.max_connections));
        weight.get_or_create(&labels()).set(i64::from(view.weight));
        sessions.get_or_create(&labels()).inc_by(view.connects);
        errors.get_or_create(&labels()).inc_by(view.failures);
        bytes_in.get_or_create(&labels()).inc_by(view.bytes_in);
        bytes_out.get_or_create(&labels()).inc_by(view.bytes_out);
        check_failures.get_or_create(&labels()).inc_by(view.checks_failed);
        check_duration.get_or_create(&labels()).set(view.check_us as f64 / 1e6);
        last_check.get_or_create(&labels()).set(view.last_check_unix_ms as f64 / 1000.0);
    }

    // Each live worker, by slot.
    let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    r.register_with_unit(
        "worker_heartbeat_age",
        "Time since the worker's loop last turned, by slot",
        Unit::Seconds,
        age.clone(),
    );
    let generation = gauges(r, "worker_generation", "Configuration generation of the worker, by slot");
    let state = gauges(r, "worker_state", "Worker state, by slot: 1 for the current state, 0 for the others");
    let worker_open = gauges(r, "worker_open_connections", "Connections the worker holds open now, by slot");
    let worker_accepted = counters(
        r,
        "worker_accepted_connections",
        "Connections the worker accepted since it started, by slot",
        None,
    );
    let full = counters(r, "worker_full", "Times the worker reached max_connections_per_worker, by slot", None);
    for (index, score) in board.slots().iter().enumerate() {
        let current = score.state();
        if current == SlotState::Empty {
            continue;
        }
        let slot = || vec![("slot", index.to_string())];
        let beat = load(&score.heartbeat_ms);
        age.get_or_create(&slot()).set(now_ms.saturating_sub(beat) as f64 / 1000.0);
        generation.get_or_create(&slot()).set(saturating(load(&score.generation)));
        for each in [SlotState::Booting, SlotState::Ready, SlotState::Draining] {
            let labels = vec![("slot", index.to_string()), ("state", each.name().to_owned())];
            state.get_or_create(&labels).set(i64::from(each == current));
        }
        worker_open.get_or_create(&slot()).set(saturating(load(&score.open)));
        worker_accepted.get_or_create(&slot()).inc_by(load(&score.accepted));
        full.get_or_create(&slot()).inc_by(load(&score.full));
    }
    registry
}

/// OpenMetrics text as the `prometheus_client` crate writes it, rewritten into the
/// Prometheus text format 0.0.4: counter families are named with their `_total` suffix on
/// their `# HELP` and `# TYPE` lines, and `# UNIT` and `# EOF` lines are left out. Samples,
/// label escaping (backslash, quote, newline) and numbers are the same in both.
pub fn to_text_004(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match descriptor {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{kind}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scoreboard with one ready worker that served an echo listener.
    fn board() -> Scoreboard {
        let board = Scoreboard::create(None, 2).unwrap();
        board.header().generation.store(2, Ordering::Relaxed);
        board.header().reloads_ok.store(1, Ordering::Relaxed);
        board.name_listeners([(0, "echo", "127.0.0.1:7".parse().ok().as_ref())]);
        board.claim(0, 2);
        board.slot(0).set_state(SlotState::Ready);
        let row = &board.listener_rows(0)[0];
        row.accepted.store(3, Ordering::Relaxed);
        row.bytes_in.store(10, Ordering::Relaxed);
        row.refused[Refusal::Denied as usize].store(2, Ordering::Relaxed);
        board
    }

    #[test]
    fn openmetrics_and_text_004_carry_the_same_samples() {
        let board = board();
        let open = render(&board, true);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE preforkd_reloads counter\n"), "{open}");
        assert!(open.contains("preforkd_reloads_total{result=\"applied\"} 1\n"), "{open}");
        let text = render(&board, false);
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(text.contains("# TYPE preforkd_reloads_total counter\n"), "{text}");
        assert!(text.contains("# HELP preforkd_reloads_total Reloads"), "{text}");
        assert!(text.contains("# TYPE preforkd_generation gauge\npreforkd_generation 2\n"), "{text}");
        for sample in [
            "preforkd_listener_accepted_connections_total{listener=\"echo\"} 3\n",
            "preforkd_listener_received_bytes_total{listener=\"echo\"} 10\n",
            "preforkd_listener_refused_connections_total{listener=\"echo\",reason=\"denied\"} 2\n",
            "preforkd_worker_state{slot=\"0\",state=\"ready\"} 1\n",
            "preforkd_worker_generation{slot=\"0\"} 2\n",
            "preforkd_upgrade_state{state=\"none\"} 1\n",
        ] {
            assert!(text.contains(sample), "{sample} missing from\n{text}");
            assert!(open.contains(sample), "{sample} missing from\n{open}");
        }
        assert!(!text.contains("slot=\"1\""), "an empty slot has no series");
    }

    #[test]
    fn the_man_page_and_the_readme_name_every_metric() {
        let text = render(&board(), false);
        let root = env!("CARGO_MANIFEST_DIR");
        let man = std::fs::read_to_string(format!("{root}/man/preforkd.toml.5")).unwrap();
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split(' ').next())
            .collect();
        assert!(names.len() >= 20, "{names:?}");
        for name in names {
            assert!(man.contains(name), "man/preforkd.toml.5 does not document {name}");
            assert!(readme.contains(name), "README.md does not mention {name}");
        }
    }
}
