#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| unimic_fuzz::part_header::run(data));
