//! The DATA decoder never panics, whatever the chunking, and its output only ever has CRLF
//! line endings (so nothing can end or split the message upstream: no smuggling).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mfd_relay::smtp::data::{DotDecoder, Progress};

fuzz_target!(|input: (bool, u8, Vec<u8>)| {
    let (bare_lf, step, data) = input;
    let step = usize::from(step.max(1));
    let mut whole = DotDecoder::new(bare_lf);
    let mut out_whole = Vec::new();
    let done_whole = whole.feed(&data, &mut out_whole);
    let mut pieces = DotDecoder::new(bare_lf);
    let mut out_pieces = Vec::new();
    let mut done_pieces = Progress::NeedMore;
    let mut offset = 0;
    for chunk in data.chunks(step) {
        if let Progress::Done { consumed } = pieces.feed(chunk, &mut out_pieces) {
            done_pieces = Progress::Done { consumed: offset + consumed };
            break;
        }
        offset += chunk.len();
    }
    assert_eq!(done_whole, done_pieces, "chunking changes where the data ends");
    assert_eq!(out_whole, out_pieces, "chunking changes the content");
    for (i, &b) in out_whole.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && out_whole[i - 1] == b'\r', "bare LF in the output");
        }
    }
});
