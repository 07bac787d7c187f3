//! Text tokenizers: the [`TextTokenizer`] trait and [`O200k`] (OpenAI's o200k_base through
//! tiktoken-rs, whose BPE tables are compiled in, so it works offline).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};

use thiserror::Error;

/// Why text could not be decoded from ids.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TextError {
    /// An id is not in the tokenizer's vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
    /// The ids do not form valid UTF-8 text.
    #[error("token ids do not decode to valid UTF-8")]
    InvalidUtf8,
}

/// A text tokenizer: text to ids and back.
pub trait TextTokenizer: Send + Sync {
    /// A stable name, e.g. `"o200k_base"` (named in the handshake).
    fn name(&self) -> &str;
    /// Number of ids; every id is below it.
    fn vocab_size(&self) -> u32;
    /// Tokenizes text (special-token strings are treated as ordinary text).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Detokenizes ids.
    fn decode(&self, ids: &[u32]) -> Result<String, TextError>;
}

/// Number of ids of o200k_base (ordinary ranks `0..199_998` plus special tokens up to 200,018).
pub const O200K_VOCAB: u32 = 200_019;

/// o200k_base. The BPE tables load once per process (hundreds of milliseconds the first time);
/// the ids of recent short texts (up to 32 bytes, a streamed reply's deltas) are remembered, in
/// a bounded map shared by the process.
///
/// ```
/// use unimic_codec::text::{O200k, TextTokenizer};
/// let t = O200k::new();
/// let ids = t.encode("A dog runs on the beach .");
/// assert_eq!(t.decode(&ids).unwrap(), "A dog runs on the beach .");
/// assert!(ids.iter().all(|&i| i < t.vocab_size()));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct O200k;

impl O200k {
    /// The tokenizer (loading is deferred to first use).
    pub fn new() -> Self {
        Self
    }
}

/// Texts up to this many bytes are remembered with their ids (see [`memo`]).
const MEMO_TEXT_BYTES: usize = 32;
/// Short texts remembered at most (emptied when full: bounded, about 1 MB at most).
const MEMO_ENTRIES: usize = 4096;

/// Ids of short texts tokenized recently. A streamed reply tokenizes one delta (a word or two)
/// at a time, far apart: the regex and BPE tables are then cold in the CPU's caches and one
/// delta takes microseconds; the same words recur, and a hash lookup costs a fraction of that.
fn memo() -> MutexGuard<'static, HashMap<Box<str>, Vec<u32>>> {
    static MEMO: LazyLock<Mutex<HashMap<Box<str>, Vec<u32>>>> = LazyLock::new(Default::default);
    // The map is only ever complete entries: a panic elsewhere cannot leave it half-written.
    MEMO.lock().unwrap_or_else(|p| p.into_inner())
}

impl TextTokenizer for O200k {
    fn name(&self) -> &str {
        "o200k_base"
    }

    fn vocab_size(&self) -> u32 {
        O200K_VOCAB
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        if text.len() > MEMO_TEXT_BYTES {
            return tiktoken_rs::o200k_base_singleton().encode_ordinary(text);
        }
        if let Some(ids) = memo().get(text) {
            return ids.clone();
        }
        let ids = tiktoken_rs::o200k_base_singleton().encode_ordinary(text);
        let mut memo = memo();
        if memo.len() >= MEMO_ENTRIES {
            memo.clear();
        }
        memo.insert(text.into(), ids.clone());
        ids
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        if let Some(&bad) = ids.iter().find(|&&i| i >= O200K_VOCAB) {
            return Err(TextError::UnknownId(bad));
        }
        let bpe = tiktoken_rs::o200k_base_singleton();
        let bytes = bpe
            .decode_bytes(ids)
            .map_err(|e| TextError::UnknownId(e.token))?;
        String::from_utf8(bytes).map_err(|_| TextError::InvalidUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Remembered or not, short or long, asked once or again: the ids are tiktoken's.
        #[test]
        fn remembered_ids_are_the_tokenizers(text in "\\PC{0,48}") {
            let direct = tiktoken_rs::o200k_base_singleton().encode_ordinary(&text);
            prop_assert_eq!(&O200k.encode(&text), &direct);
            prop_assert_eq!(&O200k.encode(&text), &direct);
            prop_assert_eq!(O200k.decode(&direct).unwrap(), text);
        }
    }

    #[test]
    fn the_memo_stays_bounded() {
        for i in 0..MEMO_ENTRIES + 10 {
            let text = format!(" w{i}");
            assert_eq!(
                O200k.encode(&text),
                tiktoken_rs::o200k_base_singleton().encode_ordinary(&text)
            );
        }
        assert!(memo().len() <= MEMO_ENTRIES);
    }
}
