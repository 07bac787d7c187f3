//! [`AdaptiveGrid`]: counts conditioned on already-coded neighbours in a token grid, blended
//! from the most specific context down to uniform, and updated after every token.
//!
//! # Algorithm (normative: encoder and decoder must update identically; see docs/CODING.md)
//! For the token at row-major index `p` of a grid of width `w`, coded in a chunk that starts at
//! index `start`, the neighbours are `L = p-1` (if `p % w > 0`), `U = p-w`, `UL = p-w-1` (if
//! `p % w > 0`), `UR = p-w+1` (if `p % w + 1 < w`); a neighbour is *absent* (value `NONE =
//! 2^32-1`) when it falls outside the grid or before `start` (chunks are independent).
//! Four sparse count tables are keyed by `(1, L, U, UL, UR)`, `(2, L, U)`, `(3, L)` and
//! `(4, U)`; an order-0 table counts every token. The weights for the next token are a
//! Witten–Bell blend computed in fixed point (`r` starts at `2^32`): for each table in that
//! order, then order-0, with total `N > 0` and `D` distinct symbols,
//! `share = floor(r * N / (N + D))`, `coef = floor(share * 2^16 / N)`, `r -= share`; the
//! uniform floor gets `coef_u = max(1, floor(r * 2^16 / K))`. Then
//! `w_s = Σ coef * count(s) + coef_u`, quantized by the crate rule. After coding a token `s`,
//! each of the four tables and order-0 add one to `s`; a sparse table whose total exceeds 4,096
//! and order-0 when its total exceeds 2^22 halve every count, rounding up; when the tables hold
//! more than 2^20 (context, symbol) pairs, the four sparse tables are cleared.

use super::{Fenwick, Quantized, WeightPrefix};
use crate::coder::{CodeError, Decoder, Encoder};
use std::collections::HashMap;
use std::ops::Range;

const NONE: u32 = u32::MAX;
const SPARSE_HALVE_AT: u32 = 4096;
const ORDER0_HALVE_AT: u64 = 1 << 22;
const MAX_PAIRS: usize = 1 << 20;
const ONE: u64 = 1 << 32;

/// Sparse counts of one context: `(symbol, count)` sorted by symbol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counts {
    total: u32,
    entries: Vec<(u32, u32)>,
}

impl Counts {
    fn prefix(&self, i: u32) -> u64 {
        let mut s = 0u64;
        for &(sym, c) in &self.entries {
            if sym >= i {
                break;
            }
            s += u64::from(c);
        }
        s
    }

    /// Adds one to `sym`; returns true when a new (context, symbol) pair was created.
    fn add(&mut self, sym: u32) -> bool {
        self.total += 1;
        let new = match self.entries.binary_search_by_key(&sym, |e| e.0) {
            Ok(i) => {
                self.entries[i].1 += 1;
                false
            }
            Err(i) => {
                self.entries.insert(i, (sym, 1));
                true
            }
        };
        if self.total > SPARSE_HALVE_AT {
            self.total = 0;
            for e in &mut self.entries {
                e.1 = e.1.div_ceil(2);
                self.total += e.1;
            }
        }
        new
    }
}

/// The adaptive token-grid model; its state is what it has learned so far (within a chunk and
/// from the context it was trained on). Clone it to branch.
///
/// ```
/// use unimic_codec::coder::{Decoder, Encoder};
/// use unimic_codec::entropy::AdaptiveGrid;
/// let ids: Vec<u32> = (0..64).map(|i| (i / 8 % 2) * 7).collect(); // 8x8 stripes
/// let mut enc = Encoder::new();
/// AdaptiveGrid::new(1024).encode(&mut enc, &ids, 8, 0..64).unwrap();
/// let bytes = enc.finish();
/// assert!(bytes.len() < 64 * 10 / 8 / 2); // far below 10 bits per token
/// let mut back = Vec::new();
/// AdaptiveGrid::new(1024).decode(&mut Decoder::new(&bytes), &mut back, 8, 0..64).unwrap();
/// assert_eq!(back, ids);
/// ```
#[derive(Debug, Clone)]
pub struct AdaptiveGrid {
    k: u32,
    order0: Fenwick,
    order0_distinct: u64,
    tables: HashMap<[u32; 5], Counts>,
    pairs: usize,
}

/// The weights for one token: a lazy prefix-sum view over the model's tables.
struct Blend<'a> {
    k: u32,
    sparse: [(u64, Option<&'a Counts>); 4],
    order0: (u64, &'a Fenwick),
    coef_u: u64,
}

impl WeightPrefix for Blend<'_> {
    fn len(&self) -> u32 {
        self.k
    }
    fn prefix(&self, i: u32) -> u64 {
        let mut s = self.coef_u * u64::from(i);
        for (coef, counts) in &self.sparse {
            if let Some(c) = counts {
                s += coef * c.prefix(i);
            }
        }
        if self.order0.0 > 0 {
            s += self.order0.0 * self.order0.1.prefix(i as usize);
        }
        s
    }

    /// One descent of the order-0 tree. The sparse tables are walked alongside with one cursor
    /// each: the descent only moves forward, so a candidate position adds the entries between
    /// the accepted position and itself. `P(i)` is the same integer as [`Self::prefix`] computes,
    /// so the result equals the binary search.
    fn search(&self, ok: &mut dyn FnMut(u32, u64) -> bool) -> u32 {
        let (coef_u, (coef0, order0)) = (self.coef_u, self.order0);
        // Per sparse table: entries below the accepted position, and their weighted sum.
        let mut cursor = [0usize; 4];
        let mut below = 0u64;
        let found = order0.search(|i, f| {
            let i = i as u32;
            if i >= self.k {
                return false;
            }
            let mut next = cursor;
            let mut sum = below;
            for (t, (coef, counts)) in self.sparse.iter().enumerate() {
                if let Some(c) = counts {
                    while let Some(&(sym, n)) = c.entries.get(next[t]) {
                        if sym >= i {
                            break;
                        }
                        sum += coef * u64::from(n);
                        next[t] += 1;
                    }
                }
            }
            let yes = ok(i, coef_u * u64::from(i) + sum + coef0 * f);
            if yes {
                cursor = next;
                below = sum;
            }
            yes
        });
        found as u32
    }
}

impl AdaptiveGrid {
    /// A model that has learned nothing, for codebooks of `k` entries (`1..=65536`, clamped).
    pub fn new(k: u32) -> Self {
        let k = k.clamp(1, super::MAX_ALPHABET);
        Self {
            k,
            order0: Fenwick::new(k as usize),
            order0_distinct: 0,
            tables: HashMap::new(),
            pairs: 0,
        }
    }

    /// Codebook size.
    pub fn codebook_size(&self) -> u32 {
        self.k
    }

    fn keys(chunk: &[u32], start: usize, p: usize, width: usize) -> [[u32; 5]; 4] {
        let col = p % width;
        let get = |q: Option<usize>| match q {
            Some(q) if q >= start && q < p => chunk.get(q - start).copied().unwrap_or(NONE),
            _ => NONE,
        };
        let l = get((col > 0).then(|| p - 1));
        let u = get(p.checked_sub(width));
        let ul = get((col > 0).then(|| p.checked_sub(width + 1)).flatten());
        let ur = get((col + 1 < width)
            .then(|| p.checked_sub(width - 1))
            .flatten());
        [
            [1, l, u, ul, ur],
            [2, l, u, 0, 0],
            [3, l, 0, 0, 0],
            [4, u, 0, 0, 0],
        ]
    }

    fn blend(&self, keys: &[[u32; 5]; 4]) -> Quantized<Blend<'_>> {
        let mut r = ONE;
        let mut sparse = [(0u64, None); 4];
        for (slot, key) in sparse.iter_mut().zip(keys) {
            if let Some(c) = self.tables.get(key) {
                if c.total > 0 {
                    let n = u64::from(c.total);
                    let d = c.entries.len() as u64;
                    let share = r * n / (n + d);
                    *slot = ((share << 16) / n, Some(c));
                    r -= share;
                }
            }
        }
        let n0 = self.order0.total();
        let mut coef0 = 0;
        if n0 > 0 {
            let share = r * n0 / (n0 + self.order0_distinct);
            coef0 = (share << 16) / n0;
            r -= share;
        }
        let coef_u = ((r << 16) / u64::from(self.k)).max(1);
        Quantized::new(Blend {
            k: self.k,
            sparse,
            order0: (coef0, &self.order0),
            coef_u,
        })
    }

    fn update(&mut self, keys: [[u32; 5]; 4], s: u32) {
        for key in keys {
            if self.tables.entry(key).or_default().add(s) {
                self.pairs += 1;
            }
        }
        if self.order0.get(s as usize) == 0 {
            self.order0_distinct += 1;
        }
        self.order0.add(s as usize, 1);
        if self.order0.total() > ORDER0_HALVE_AT {
            self.order0.halve();
        }
        if self.pairs > MAX_PAIRS {
            self.tables.clear();
            self.pairs = 0;
        }
    }

    /// Encodes the tokens `ids[range]` of a grid of `width` columns (`ids` is the whole grid in
    /// row-major order), learning as it goes. Neighbours before `range.start` are absent.
    pub fn encode(
        &mut self,
        enc: &mut Encoder,
        ids: &[u32],
        width: u32,
        range: Range<usize>,
    ) -> Result<(), CodeError> {
        let width = (width as usize).max(1);
        let chunk = ids.get(range.clone()).ok_or(CodeError::InvalidData)?;
        for (i, &s) in chunk.iter().enumerate() {
            let keys = Self::keys(chunk, range.start, range.start + i, width);
            enc.encode(s, &self.blend(&keys))?;
            self.update(keys, s);
        }
        Ok(())
    }

    /// Decodes the tokens at indices `range` of a grid of `width` columns, appending them to
    /// `out`.
    pub fn decode(
        &mut self,
        dec: &mut Decoder,
        out: &mut Vec<u32>,
        width: u32,
        range: Range<usize>,
    ) -> Result<(), CodeError> {
        let width = (width as usize).max(1);
        let base = out.len();
        for p in range.clone() {
            let keys = Self::keys(&out[base..], range.start, p, width);
            let s = dec.decode(&self.blend(&keys))?;
            out.push(s);
            self.update(keys, s);
        }
        Ok(())
    }

    /// Learns a whole grid without coding it (the session context both ends already hold).
    /// Ids not below the codebook size make the grid ignored entirely.
    pub fn learn(&mut self, ids: &[u32], width: u32) {
        if ids.iter().any(|&s| s >= self.k) {
            return;
        }
        let width = (width as usize).max(1);
        for (p, &s) in ids.iter().enumerate() {
            let keys = Self::keys(ids, 0, p, width);
            self.update(keys, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::{Distribution, TOTAL};

    /// The binary search over `C` that decoding used before [`WeightPrefix::search`].
    fn bisect(d: &impl Distribution, q: u32) -> u32 {
        let (mut lo, mut hi) = (0u32, d.alphabet_size());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if d.cumulative(mid) <= q {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    #[test]
    fn tree_search_equals_binary_search() {
        for k in [1u32, 2, 5, 300, 1024, 65_536] {
            let mut m = AdaptiveGrid::new(k);
            let w = 16usize;
            let mut z = u64::from(k);
            let ids: Vec<u32> = (0..w * 24)
                .map(|i| {
                    z = crate::nn::weights::splitmix64(z);
                    if z % 3 == 0 {
                        (z >> 20) as u32 % k
                    } else {
                        ((i / w / 4) * 7 + (i % w) / 5) as u32 % k
                    }
                })
                .collect();
            m.learn(&ids[..w * 16], w as u32);
            // Blends with every mix of present and absent contexts, including none learned.
            for p in [0usize, 3, w * 16 + 5, w * 20 + 9] {
                let keys = AdaptiveGrid::keys(&ids, 0, p, w);
                for model in [&m, &AdaptiveGrid::new(k)] {
                    let d = model.blend(&keys);
                    let mut qs: Vec<u32> = (0..200u32).map(|i| i * (TOTAL / 200)).collect();
                    for s in [0, 1, k / 2, k.saturating_sub(1)] {
                        let c = d.cumulative(s);
                        qs.extend([c, c.saturating_sub(1), c + 1, d.cumulative(s + 1) - 1]);
                    }
                    qs.push(TOTAL - 1);
                    for q in qs.into_iter().filter(|&q| q < TOTAL) {
                        assert_eq!(d.symbol_at(q), bisect(&d, q), "k {k} p {p} q {q}");
                    }
                }
            }
        }
    }
}
