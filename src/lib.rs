//! mfd-relay: a LAN SMTP relay that lets office printers and scanners send mail through
//! Office 365 and Gmail with OAuth 2.0 (SASL XOAUTH2).
//!
//! The data path, one module each:
//! `smtp` (listener → session) → `devices` (who is this, which identity) → `queue` (spool +
//! durable record) → `delivery` (in-session first, then retries) → `upstream` (XOAUTH2 to the
//! provider). Beside it: `oauth` (token manager, sign-in flows, encrypted store), `imap`
//! (mobile print), `admin` (HTTP: metrics, health, control), `notify` (the admin told by mail
//! or webhook), `store` (the only user of sled),
//! `config` and `metrics` (everything the admin configures and watches, each in one place).
//! `generation` builds one configuration's parts; `relay` (the wiring, imported by no module)
//! runs them and publishes each generation on reload.

pub mod activity;
pub mod admin;
pub mod certs;
pub mod config;
pub mod credentials;
pub mod delivery;
pub mod devices;
pub mod filenames;
pub mod fsutil;
pub mod generation;
pub mod imap;
pub mod legacy_tls;
pub mod locks;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod oauth;
pub mod queue;
pub mod relay;
pub mod reply;
pub mod smtp;
pub mod store;
pub mod testsend;
pub mod tls;
pub mod upstream;
