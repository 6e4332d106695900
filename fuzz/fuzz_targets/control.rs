//! Feeds arbitrary bytes to the control-stream decoder in arbitrary chunks: it must return
//! messages or errors, never panic, and never buffer past one capsule's limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webnic_stack::protocol::{CapsuleDecoder, MAX_CAPSULE_VALUE};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = CapsuleDecoder::new();
    for piece in rest.chunks(chunk) {
        decoder.extend(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => {
                    // Whatever parses must re-encode to something that parses the same.
                    let mut wire = Vec::new();
                    message.emit(&mut wire);
                    let mut again = CapsuleDecoder::new();
                    again.extend(&wire);
                    assert_eq!(again.next_message().ok().flatten(), Some(message));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(decoder.buffered() <= MAX_CAPSULE_VALUE + 16 + piece.len());
    }
});
