#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| unimic_fuzz::umic_file::run(data));
