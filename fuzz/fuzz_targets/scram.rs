//! `cargo fuzz run scram`: see `pgmux::fuzzing::scram_exchange` for what the input holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzzing::scram_exchange(data));
