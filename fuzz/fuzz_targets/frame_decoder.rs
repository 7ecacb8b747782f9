//! Fuzzes the wire protocol's decoders: frames (with a small limit, so the length check is hit)
//! and, for every frame that decodes, its body as a request and as a response.
#![no_main]

use chunkstore::protocol::{decode_body, decode_frame, Request, Response};
use libfuzzer_sys::fuzz_target;

const FRAME_BYTES_MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match decode_frame(&data[at..], FRAME_BYTES_MAX) {
            Ok(Some((frame, used))) => {
                assert!(used > 0 && used <= data.len() - at);
                assert!(frame.body.len() <= FRAME_BYTES_MAX);
                let _ = decode_body::<Request>(&frame.body, FRAME_BYTES_MAX);
                let _ = decode_body::<Response>(&frame.body, FRAME_BYTES_MAX);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = decode_body::<Request>(data, FRAME_BYTES_MAX);
});
