#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| unimic_fuzz::transformer_decode::run(data));
