//! unimic-codec: tokenizers (image VQ, text BPE), entropy models, range coding and the session
//! context. It knows nothing of sockets or LMMs.
//!
//! Feature `vq` (default) adds the candle VQ image tokenizer, image I/O and training; without it the
//! crate still codes token grids and text.
#![warn(missing_docs)]

pub mod coder;
pub mod context;
pub mod entropy;
pub mod grid;
pub mod nn;
pub mod part;
#[cfg(feature = "vq")]
pub mod rdo;
pub mod shipped;
pub mod text;
#[cfg(feature = "vq")]
pub mod tokenizer;
pub mod umic;
