//! Integration tests: the real `preforkd` binary, real TCP and UDP on 127.0.0.x.

mod harness;

mod backends;
mod config;
mod echo;
mod example;
mod idle;
mod lifecycle;
mod limits;
mod resources;
mod services;
mod supervision;
mod syslog;
mod systemd;
mod tftp;
mod udp;
mod upgrade;
