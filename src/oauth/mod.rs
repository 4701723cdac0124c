//! OAuth 2.0 identities: where each provider is (`provider`), how tokens are obtained
//! (`flows`, `jwt`), kept fresh (`tokens`), and stored encrypted (`vault`).

pub mod flows;
pub mod jwt;
pub mod login;
pub mod provider;
pub mod tokens;
pub mod vault;
