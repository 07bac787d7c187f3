//! A Fenwick (binary indexed) tree of `u64` counts: prefix sums and point updates in `O(log n)`.

/// Counts over `0..n` with `O(log n)` prefix sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fenwick {
    tree: Vec<u64>,
    total: u64,
}

impl Fenwick {
    /// All-zero counts over `0..n`.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            tree: vec![0; n + 1],
            total: 0,
        }
    }

    /// Number of slots.
    pub(crate) fn len(&self) -> usize {
        self.tree.len() - 1
    }

    /// Sum of all counts.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Adds `delta` to slot `i` (ignored when `i` is out of range).
    pub(crate) fn add(&mut self, i: usize, delta: u64) {
        if i >= self.len() {
            return;
        }
        self.total += delta;
        let mut j = i + 1;
        while j < self.tree.len() {
            self.tree[j] += delta;
            j += j & j.wrapping_neg();
        }
    }

    /// Sum of slots `0..i` (`i` is clamped to `len()`).
    /// Takes back an earlier [`add`](Self::add) of `delta` at `i` (the caller guarantees it).
    pub(crate) fn sub(&mut self, i: usize, delta: u64) {
        if i >= self.len() {
            return;
        }
        self.total -= delta;
        let mut j = i + 1;
        while j < self.tree.len() {
            self.tree[j] -= delta;
            j += j & j.wrapping_neg();
        }
    }

    pub(crate) fn prefix(&self, i: usize) -> u64 {
        let mut j = i.min(self.len());
        let mut s = 0;
        while j > 0 {
            s += self.tree[j];
            j &= j - 1;
        }
        s
    }

    /// The largest `i` in `0..=len()` with `ok(i, prefix(i))`, for a predicate that holds at
    /// `i = 0` and is monotone (true up to some point, false after): one descent of the tree,
    /// `O(log n)` steps, each with the prefix sum at hand instead of recomputed.
    pub(crate) fn search(&self, mut ok: impl FnMut(usize, u64) -> bool) -> usize {
        let n = self.len();
        let mut pos = 0;
        let mut sum = 0;
        let mut step = if n == 0 { 0 } else { 1 << n.ilog2() };
        while step > 0 {
            let next = pos + step;
            // `pos` is a multiple of `2 * step`, so `tree[next]` sums the slots `pos..next`.
            if next <= n {
                let s = sum + self.tree[next];
                if ok(next, s) {
                    pos = next;
                    sum = s;
                }
            }
            step >>= 1;
        }
        pos
    }

    /// The count in slot `i`.
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.prefix(i + 1) - self.prefix(i)
    }

    /// Replaces every count `c` by `ceil(c / 2)`, rebuilding the tree in `O(n)`.
    pub(crate) fn halve(&mut self) {
        let n = self.len();
        let counts: Vec<u64> = (0..n).map(|i| self.get(i).div_ceil(2)).collect();
        *self = Self::from_counts(&counts);
    }

    /// Builds the tree from counts in `O(n)`.
    pub(crate) fn from_counts(counts: &[u64]) -> Self {
        let mut tree = vec![0u64; counts.len() + 1];
        tree[1..].copy_from_slice(counts);
        for j in 1..tree.len() {
            let parent = j + (j & j.wrapping_neg());
            if parent < tree.len() {
                tree[parent] += tree[j];
            }
        }
        Self {
            tree,
            total: counts.iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_sums_match_naive() {
        let counts: Vec<u64> = (0..37).map(|i| (i * 13 % 7) as u64).collect();
        let mut f = Fenwick::new(37);
        for (i, &c) in counts.iter().enumerate() {
            f.add(i, c);
        }
        assert_eq!(f, Fenwick::from_counts(&counts));
        for i in 0..=37 {
            assert_eq!(f.prefix(i), counts[..i].iter().sum::<u64>());
        }
        for limit in [0u64, 1, 5, 40, 1000] {
            let want = (0..=37).filter(|&i| f.prefix(i) <= limit).max().unwrap();
            assert_eq!(f.search(|_, s| s <= limit), want, "limit {limit}");
            // A predicate on the index too.
            let want = (0..=37)
                .filter(|&i| i < 20 && f.prefix(i) <= limit)
                .max()
                .unwrap();
            assert_eq!(f.search(|i, s| i < 20 && s <= limit), want);
        }
        f.halve();
        assert_eq!(f.get(3), counts[3].div_ceil(2));
    }
}
