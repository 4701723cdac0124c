//! The integration tests: the real `mfd-relay` binary on loopback, driven by real clients
//! (Python smtplib, swaks, curl) against in-process fakes of the cloud ([`common`]) and, where
//! Debian has them, real Postfix and Dovecot. One test binary, so the fakes compile once;
//! `cargo test --test it spine::` runs one file's tests.

mod common;

mod abuse;
mod check;
mod clients;
mod durability;
mod fakes_selftest;
mod faults;
mod folder_bench;
mod folder_google;
mod folder_microsoft;
mod folders;
mod gmail;
mod graph;
mod hardening_admin;
mod hardening_smtp;
mod imap;
mod legacy_tls;
mod notify;
mod oauth;
mod ops;
mod pipelining;
mod postfix;
mod reload;
mod rewrite;
mod scale;
mod spine;
mod status_page;
mod test_send;
mod tokens_resources;
