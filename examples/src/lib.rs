//! Runnable unimic examples; see `examples/examples/` and `examples/README.md`.
//!
//! - `text_session`: a two-turn text session without a network: tokenize, entropy-code with
//!   session context, frame as protocol messages, parse, verify the context digest, decode.
