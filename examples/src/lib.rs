//! Runnable unimic examples live in `examples/examples/`.
