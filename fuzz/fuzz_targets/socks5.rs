//! libFuzzer target: [`weft_fuzz_cases::socks5`] holds the input's shape and
//! the invariants, which tests replay on the kept inputs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz_cases::socks5::run(data));
