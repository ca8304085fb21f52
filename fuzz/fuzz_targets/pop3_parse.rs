//! The POP3 parsers: client commands, upstream responses, multi-line data.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mailgate::pop3::parse::command(data);
    let _ = mailgate::pop3::parse::response(data);
    let _ = mailgate::pop3::parse::multiline(data);
    let _ = mailgate::pop3::parse::arguments(data);
});
