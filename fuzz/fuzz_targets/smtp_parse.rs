//! The SMTP parsers fed arbitrary lines: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::smtp::parse;

fuzz_target!(|data: &[u8]| {
    let _ = parse::command(data);
    let _ = parse::reply_line(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse::is_hello_name(text);
        let _ = parse::keyword(text);
    }
});
