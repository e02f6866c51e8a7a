//! `cargo fuzz run startup`: see `pgmux::fuzzing::startup_packet` for what the input holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzzing::startup_packet(data));
