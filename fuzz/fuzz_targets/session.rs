#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| unimic_fuzz::session::run(data));
