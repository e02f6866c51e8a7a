//! `cargo fuzz run frontend`: see `pgmux::fuzzing::frontend_messages` for what the input holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzzing::frontend_messages(data));
