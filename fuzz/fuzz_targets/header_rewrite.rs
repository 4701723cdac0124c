//! The header rewrite never panics on any message and keeps its invariant (see
//! `mfd_relay::message::invariant`): exactly one From, holding one mailbox, the identity's;
//! no device Sender or Resent-*; a valid header section; the device's body bytes unchanged.
//! With `from = "keep"` the header section is valid and the body unchanged too. Only a
//! header line too long to fold may be refused.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mfd_relay::message::{invariant, rewrite_message, Changes, Refusal, MAX_LINE};

const IDENTITY: &str = "scans@contoso.test";

fuzz_target!(|msg: &[u8]| {
    for rewrite_from in [Some(IDENTITY), None] {
        let c = Changes {
            received: "Received: from fuzz",
            rewrite_from,
            hostname: "relay.test",
            unique: "FUZZ",
            now: chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
        };
        match rewrite_message(msg, &c) {
            Ok(out) => {
                if let Err(e) = invariant::check(msg, &out, rewrite_from) {
                    panic!(
                        "{e}\ninput: {:?}\noutput: {:?}",
                        String::from_utf8_lossy(msg),
                        String::from_utf8_lossy(&out)
                    );
                }
            }
            Err(Refusal::LongLine(_)) => {
                assert!(msg.split(|&b| b == b'\n').any(|l| l.len() > MAX_LINE), "refused without a long line");
            }
            Err(e) => panic!("refused: {e}"),
        }
    }
});
