//! Text ids to strings as they stream in: a delta may end inside a UTF-8 character (a byte-level
//! BPE token can hold part of one, and a sender may split a part's ids anywhere), so ids that do
//! not decode yet wait for the next ones.

use unimic_codec::text::{TextError, TextTokenizer};

/// Most ids held back waiting for the rest of a character (a UTF-8 character is at most four
/// bytes, so a few ids always complete one; beyond this the ids are decoded lossily).
const MAX_PENDING: usize = 16;

/// Turns streamed text ids into string deltas.
#[derive(Debug, Default)]
pub(crate) struct TextDecoder {
    pending: Vec<u32>,
}

impl TextDecoder {
    /// Adds `ids`; returns the text they complete (possibly empty).
    pub fn push(&mut self, tok: &dyn TextTokenizer, ids: &[u32]) -> Result<String, TextError> {
        self.pending.extend_from_slice(ids);
        if self.pending.is_empty() {
            return Ok(String::new());
        }
        // The longest prefix that decodes, trying the whole first (the usual case).
        for keep in 0..self.pending.len().min(MAX_PENDING) {
            let end = self.pending.len() - keep;
            match tok.decode(&self.pending[..end]) {
                Ok(text) => {
                    self.pending.drain(..end);
                    return Ok(text);
                }
                Err(TextError::InvalidUtf8) => continue,
                Err(e) => return Err(e),
            }
        }
        if self.pending.len() >= MAX_PENDING {
            return self.finish(tok);
        }
        Ok(String::new())
    }

    /// Decodes a whole part's ids (invalid UTF-8 replaced).
    pub fn push_all(&mut self, tok: &dyn TextTokenizer, ids: &[u32]) -> Result<String, TextError> {
        self.pending.extend_from_slice(ids);
        self.finish(tok)
    }

    /// Whatever is left at the end of the part, decoded (invalid UTF-8 replaced).
    pub fn finish(&mut self, tok: &dyn TextTokenizer) -> Result<String, TextError> {
        let ids = std::mem::take(&mut self.pending);
        if ids.is_empty() {
            return Ok(String::new());
        }
        match tok.decode(&ids) {
            Ok(t) => Ok(t),
            Err(TextError::InvalidUtf8) => {
                // Decode id by id and keep what is valid.
                let mut out = String::new();
                for id in ids {
                    out.push_str(&tok.decode(&[id]).unwrap_or_else(|_| "\u{fffd}".into()));
                }
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimic_codec::text::O200k;

    #[test]
    fn characters_split_across_deltas_come_out_whole() {
        let tok = O200k::new();
        let text = "naïve 日本語 🐕 done";
        let ids = tok.encode(text);
        // Feed one id at a time: every delta is valid UTF-8 and they add up to the text.
        let mut dec = TextDecoder::default();
        let mut out = String::new();
        for id in &ids {
            out.push_str(&dec.push(&tok, std::slice::from_ref(id)).unwrap());
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, text);
        // An id outside the vocabulary is an error.
        assert!(dec.push(&tok, &[u32::MAX]).is_err());
    }
}
