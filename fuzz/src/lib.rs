//! Bodies of the unimic fuzz targets.
//!
//! Each target is a module with `pub fn run(data: &[u8])` that panics when an invariant breaks.
//! `fuzz_targets/<name>.rs` hands libFuzzer's input to it, and `tests/seeds.rs` runs it over every
//! file in `seeds/<name>/` so that `cargo test` replays the seed corpus and past crashes.
//!
//! To add a target: write `src/<name>.rs` with `pub fn run(data: &[u8])`, declare it below and in
//! [`TARGETS`], add `fuzz_targets/<name>.rs` and a `[[bin]]` entry in Cargo.toml, and commit a few
//! seeds in `seeds/<name>/`.

#![warn(missing_docs)]

pub mod codec_decode;
pub mod frame_stream;
pub mod handshake;
pub mod message;
pub mod part_header;
pub mod session;
pub mod transformer_decode;
pub mod umic_file;

/// A target body: panics when an invariant breaks.
pub type Body = fn(&[u8]);

/// Every target: its name (the seed directory) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("frame_stream", frame_stream::run),
    ("message", message::run),
    ("handshake", handshake::run),
    ("codec_decode", codec_decode::run),
    ("transformer_decode", transformer_decode::run),
    ("umic_file", umic_file::run),
    ("part_header", part_header::run),
    ("session", session::run),
];
