//! Image tokenizers: images to [`crate::grid::TokenGrid`]s and back (filled by the tokenizer issue).
