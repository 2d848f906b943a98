//! Integration tests: the real `preforkd` binary, real TCP on 127.0.0.x.

mod harness;

mod backends;
mod config;
mod echo;
mod example;
mod exec;
mod handoff;
mod hardening;
mod idle;
mod lifecycle;
mod limits;
mod resources;
mod services;
mod supervision;
mod syslog;
mod systemd;
mod upgrade;
