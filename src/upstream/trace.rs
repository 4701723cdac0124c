//! Watching a delivery step by step: `mfd-relay test` (and `POST /api/test`) pass an
//! [`Observer`] that prints each step as it finishes; real delivery passes [`NoTrace`], so the
//! same upstream code runs either way and nothing is formatted for nobody.

use std::time::Instant;

use serde::Serialize;

/// One finished step of a delivery: `token`, `connect`, `tls`, `auth`, `mail`, `rcpt` (one
/// per recipient), `data` or `final`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    /// Milliseconds the step took (for pipelined commands: from the flight's write to this
    /// command's reply).
    pub ms: u64,
    /// What happened: the provider's own reply, the TLS version, the token's expiry.
    pub detail: String,
}

/// Receives each step as it finishes.
pub trait Observer: Send + Sync {
    /// False when nobody looks (the details are then never formatted).
    fn wants(&self) -> bool {
        true
    }
    fn step(&self, step: Step);
}

/// The observer of real delivery: sees nothing.
pub struct NoTrace;

impl Observer for NoTrace {
    fn wants(&self) -> bool {
        false
    }
    fn step(&self, _: Step) {}
}

/// Reports a step begun at `since`, formatting its detail only when someone looks.
pub fn emit(obs: &dyn Observer, name: &str, ok: bool, since: Instant, detail: impl FnOnce() -> String) {
    if obs.wants() {
        let ms = since.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        obs.step(Step { name: name.to_string(), ok, ms, detail: detail() });
    }
}
