//! Integration tests: the real `preforkd` binary, real TCP and UDP on 127.0.0.x.

mod harness;

mod admission;
mod backends;
mod banner;
mod config;
mod echo;
mod example;
mod exec;
mod full_disk;
mod handoff;
mod hardening;
mod hooks;
mod idle;
mod import;
mod include;
mod json_log;
mod keys;
mod kv;
mod lifecycle;
mod limits;
mod metrics;
mod newcomer;
mod recycling;
mod relay;
mod resources;
mod services;
mod status;
mod supervision;
mod syslog;
mod systemd;
mod tftp;
mod tls;
mod udp;
mod unix;
mod upgrade;
