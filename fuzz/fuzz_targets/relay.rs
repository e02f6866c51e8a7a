//! `cargo fuzz run relay`: see `pgmux::fuzzing::relay_conversation` for what the input holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzzing::relay_conversation(data));
