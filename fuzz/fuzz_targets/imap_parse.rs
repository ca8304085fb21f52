//! The IMAP parsers: client commands and upstream responses, on any line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mailgate::imap::parse::command(data);
    let _ = mailgate::imap::parse::leading_tag(data);
    let _ = mailgate::imap::parse::response(data);
});
