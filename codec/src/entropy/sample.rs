//! [`Sampler`]: draws tokens from a model's integer weights instead of decoding them, so the
//! entropy models double as generators (text-to-image, inpainting, outpainting, variations).
//!
//! Every learned model's weights are `w_i = trunc(exp(l_i - m) * 2^32)` (see
//! [`crate::nn::logits_to_weights`]), so `w_i / Σ w` is the model's probability and
//! `(w_i / w_max)^(1/T)` its tempered version. The sampler keeps the `top_k` most likely symbols
//! (0: all), tempers them, and draws with a seeded SplitMix64 generator: the same seed, weights and
//! settings give the same tokens on every run (the generator is this module's own, not a
//! library's, so a dependency upgrade cannot change it).
//!
//! ```
//! use unimic_codec::entropy::sample::Sampler;
//! let mut s = Sampler::new(7).with_temperature(0.0);
//! assert_eq!(s.pick(&[1, 9, 3]), 1); // temperature 0: the most likely symbol
//! let mut a = Sampler::new(42);
//! let mut b = Sampler::new(42);
//! let w = [5u64, 1, 8, 2];
//! assert_eq!((0..20).map(|_| a.pick(&w)).collect::<Vec<_>>(),
//!            (0..20).map(|_| b.pick(&w)).collect::<Vec<_>>());
//! ```

/// Settings and state of token sampling: a seed, a temperature and a top-k cut.
#[derive(Debug, Clone)]
pub struct Sampler {
    state: u64,
    temperature: f64,
    top_k: usize,
    order: Vec<u32>,
    probs: Vec<f64>,
}

impl Sampler {
    /// A sampler at temperature 1 with no top-k cut, seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            temperature: 1.0,
            top_k: 0,
            order: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Sets the temperature: 1 samples the model's distribution, lower sharpens it, 0 (or any
    /// value not above 1e-3, or NaN) always takes the most likely symbol. Clamped to at most 10.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = if temperature.is_nan() {
            0.0
        } else {
            f64::from(temperature).clamp(0.0, 10.0)
        };
        self
    }

    /// Keeps only the `k` most likely symbols (0: no cut).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// The temperature in use.
    pub fn temperature(&self) -> f32 {
        self.temperature as f32
    }

    /// The top-k cut in use (0: none).
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// SplitMix64: the next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in `[0, 1)` from the sampler's generator (advances it).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Draws a symbol from the integer weights `weights` (index = symbol). All-zero or empty
    /// weights mean uniform (as in the coding rule); ties at temperature 0 go to the lowest
    /// symbol.
    pub fn pick(&mut self, weights: &[u64]) -> u32 {
        if weights.is_empty() {
            return 0;
        }
        let max = weights.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return (self.next_u64() % weights.len() as u64) as u32;
        }
        if self.temperature <= 1e-3 {
            return weights.iter().position(|&w| w == max).unwrap_or(0) as u32;
        }
        self.order.clear();
        self.order
            .extend((0..weights.len() as u32).filter(|&i| weights[i as usize] > 0));
        if self.top_k > 0 && self.top_k < self.order.len() {
            // Stable order: by weight descending, then by symbol.
            self.order.sort_unstable_by(|&a, &b| {
                weights[b as usize]
                    .cmp(&weights[a as usize])
                    .then(a.cmp(&b))
            });
            self.order.truncate(self.top_k);
        }
        let inv_t = 1.0 / self.temperature;
        let max = max as f64;
        self.probs.clear();
        let mut total = 0.0;
        for &i in &self.order {
            let p = (weights[i as usize] as f64 / max).powf(inv_t);
            total += p;
            self.probs.push(total);
        }
        let u = self.uniform() * total;
        let at = self.probs.partition_point(|&c| c <= u);
        self.order[at.min(self.order.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_follow_the_weights() {
        let w = [1u64 << 32, 3 << 32, 0, 4 << 32];
        let mut s = Sampler::new(1);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[s.pick(&w) as usize] += 1;
        }
        assert_eq!(counts[2], 0, "a zero weight is never drawn");
        let f: Vec<f64> = counts.iter().map(|&c| c as f64 / 40_000.0).collect();
        assert!((f[0] - 0.125).abs() < 0.01, "{f:?}");
        assert!((f[1] - 0.375).abs() < 0.015, "{f:?}");
        assert!((f[3] - 0.5).abs() < 0.015, "{f:?}");
    }

    #[test]
    fn top_k_and_low_temperature_concentrate() {
        let w = [10u64, 50, 40, 30, 20];
        let mut s = Sampler::new(3).with_top_k(2);
        for _ in 0..500 {
            assert!(matches!(s.pick(&w), 1 | 2));
        }
        let mut cold = Sampler::new(3).with_temperature(0.05);
        let hits = (0..500).filter(|_| cold.pick(&w) == 1).count();
        assert!(hits > 490, "{hits}");
        let mut greedy = Sampler::new(3).with_temperature(0.0);
        assert_eq!(greedy.pick(&[4, 9, 9, 1]), 1);
    }

    #[test]
    fn degenerate_weights_are_uniform_and_never_panic() {
        let mut s = Sampler::new(9).with_temperature(f32::NAN).with_top_k(1);
        assert_eq!(s.pick(&[]), 0);
        let mut u = Sampler::new(9);
        let mut seen = [false; 3];
        for _ in 0..100 {
            seen[u.pick(&[0, 0, 0]) as usize] = true;
        }
        assert_eq!(seen, [true; 3]);
        let mut hot = Sampler::new(9).with_temperature(1e9);
        assert!(hot.pick(&[u64::MAX, 1]) < 2);
    }
}
