//! The models a part codec holds.

use super::*;

/// Settings of a [`PartCodec`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CodecConfig {
    /// Text id space (the text tokenizer's vocabulary size).
    pub text_space: u32,
    /// Static grid model, if any.
    pub static_grid: Option<Arc<Static>>,
    /// Text prior: the static text model, and the seed of the adaptive text model when
    /// `prime_adaptive_text` is set.
    pub text_prior: Option<Arc<TextPrior>>,
    /// Seed [`AdaptiveText`] with `text_prior` (changes the model identity).
    pub prime_adaptive_text: bool,
    /// Largest part, in tokens, this codec accepts.
    pub max_part_tokens: u64,
    /// The generic transformer model for [`ModelChoice::Generic`], if any.
    pub generic: Option<Arc<Generic>>,
    /// The masked transformer model for [`ModelChoice::Masked`], if any.
    pub masked: Option<Arc<Masked>>,
    /// The text-conditioned transformer model for [`ModelChoice::TextCond`], if any.
    pub text_cond: Option<Arc<TextCond>>,
    /// The quality ladder's models for [`ModelChoice::Ladder`], if any.
    pub ladder: Option<Arc<Ladder>>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            text_space: O200K_VOCAB,
            static_grid: None,
            text_prior: None,
            prime_adaptive_text: false,
            max_part_tokens: 1 << 22,
            generic: None,
            masked: None,
            text_cond: None,
            ladder: None,
        }
    }
}

impl CodecConfig {
    /// Sets the generic transformer model ([`ModelChoice::Generic`]).
    pub fn with_generic(mut self, model: Arc<Generic>) -> Self {
        self.generic = Some(model);
        self
    }
    /// Sets the masked transformer model ([`ModelChoice::Masked`]).
    pub fn with_masked(mut self, model: Arc<Masked>) -> Self {
        self.masked = Some(model);
        self
    }
    /// Sets the text-conditioned transformer model ([`ModelChoice::TextCond`]).
    pub fn with_text_cond(mut self, model: Arc<TextCond>) -> Self {
        self.text_cond = Some(model);
        self
    }
    /// Sets the quality ladder's models ([`ModelChoice::Ladder`]).
    pub fn with_ladder(mut self, ladder: Arc<Ladder>) -> Self {
        self.ladder = Some(ladder);
        self
    }
    /// Sets the static grid model.
    pub fn with_static_grid(mut self, model: Arc<Static>) -> Self {
        self.static_grid = Some(model);
        self
    }
    /// Sets the text prior; `prime` also seeds the adaptive text model with it.
    pub fn with_text_prior(mut self, prior: Arc<TextPrior>, prime: bool) -> Self {
        self.text_prior = Some(prior);
        self.prime_adaptive_text = prime;
        self
    }
    /// Sets the text id space.
    pub fn with_text_space(mut self, space: u32) -> Self {
        self.text_space = space;
        self
    }
}
