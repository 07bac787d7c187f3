//! [`AdaptiveText`]: an escape (PPM-style) model over the text token ids seen in a session,
//! with a documented fallback for ids not seen yet. Ids may exceed the 2^16 alphabet of one coded
//! symbol (o200k has 200,019 ids); every id stays codable.
//!
//! # Algorithm (normative; see docs/CODING.md)
//! The model keeps a *vocabulary*: the distinct ids seen so far in first-seen order (a
//! [`TextPrior`] seeds it in id order), at most 65,535 entries. Each token is coded as one
//! symbol over `V + 1` values, `V` the vocabulary size: the id's vocabulary index, or `ESC = V`
//! for an id not in the vocabulary. Weights blend, in fixed point like
//! [`AdaptiveGrid`](super::AdaptiveGrid) (`r = 2^32`; per table with total `N > 0` and `D`
//! distinct: `share = floor(r N / (N + D))`, `coef = floor(share 2^16 / N)`, `r -= share`),
//! the order-2 table keyed by the previous two indices, the order-1 table keyed by the previous
//! index, and order-0 over the vocabulary (`D = V`); `ESC` gets weight `r * 2^16`. At the start
//! of a sequence the missing previous indices are `NONE = 2^32-1`, so sequence starts have
//! contexts of their own.
//!
//! After `ESC`, the new id is coded as `hi = id >> 8` over `ceil(space / 256)` buckets and then
//! `lo = id & 255` uniform over the bucket's size. The `hi` weights blend adaptive bucket counts
//! (`share`, `coef` as above, `D` = buckets seen) with a fixed Zipf prior whose prefix sums are
//! `Z(i) = floor((Σ_{h<i} floor(2^32 / (h + 8))) / 256)`, scaled by
//! `coef_z = max(1, floor(r 2^16 / Z(n)))`, because BPE ids are roughly ordered by frequency.
//!
//! After each token (unless the model is frozen) the id joins the vocabulary if new and there is
//! room, then order-2, order-1 and order-0 add one to its index (and, after an escape, the bucket
//! counts add one to `hi`). Sparse tables halve (rounding up) above a total of 4,096, order-0
//! above 2^22; above 2^20 stored (context, symbol) pairs the order-1 and order-2 tables are
//! cleared.

use super::{Fenwick, Quantized, Uniform, WeightPrefix};
use crate::coder::{CodeError, Decoder, Encoder};
use sha2::Digest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const NONE: u32 = u32::MAX;
/// Most ids the vocabulary holds (`V + 1 <= 2^16`).
pub const MAX_VOCAB: u32 = (1 << 16) - 1;
const SPARSE_HALVE_AT: u32 = 4096;
const ORDER0_HALVE_AT: u64 = 1 << 22;
const MAX_PAIRS: usize = 1 << 20;
const ONE: u64 = 1 << 32;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counts {
    total: u32,
    entries: Vec<(u32, u32)>,
}

impl Counts {
    fn prefix(&self, i: u32) -> u64 {
        self.entries
            .iter()
            .take_while(|e| e.0 < i)
            .map(|e| u64::from(e.1))
            .sum()
    }
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

/// Order-0 id counts learned from training text: seeds the vocabulary of [`AdaptiveText`] and is
/// the whole of the `static` text model.
///
/// File format (little-endian): `"UMTXTPRI"`, version `u32` (= 1), id space `u32`, entry count
/// `n` `u32` (`<= 65535`), then `n` pairs `(id u32, count u32)` with strictly increasing ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPrior {
    space: u32,
    entries: Vec<(u32, u32)>,
    /// SHA-256 of [`to_bytes`](Self::to_bytes), computed once (a model identity names it, and
    /// identities are asked for per part and per chunk).
    hash: [u8; 32],
}

impl TextPrior {
    /// Counts the ids of `sequences` (ids `>= space` are skipped); keeps the 65,535 most frequent
    /// (ties: smaller id first), stored in id order.
    pub fn train<'a>(space: u32, sequences: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for seq in sequences {
            for &id in seq.iter().filter(|&&id| id < space) {
                let c = counts.entry(id).or_default();
                *c = c.saturating_add(1);
            }
        }
        let mut entries: Vec<(u32, u32)> = counts.into_iter().collect();
        entries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        entries.truncate(MAX_VOCAB as usize);
        entries.sort_unstable();
        Self::new(space, entries)
    }

    fn new(space: u32, entries: Vec<(u32, u32)>) -> Self {
        let mut prior = Self {
            space,
            entries,
            hash: [0; 32],
        };
        prior.hash = sha2::Sha256::digest(prior.to_bytes()).into();
        prior
    }

    /// SHA-256 of the prior's file ([`to_bytes`](Self::to_bytes)).
    pub fn content_hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The id space.
    pub fn space(&self) -> u32 {
        self.space
    }

    /// `(id, count)` in id order.
    pub fn entries(&self) -> &[(u32, u32)] {
        &self.entries
    }

    /// The prior file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"UMTXTPRI".to_vec();
        for v in [1, self.space, self.entries.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &(id, c) in &self.entries {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Parses a prior file; `None` when malformed.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
        };
        if bytes.get(..8)? != b"UMTXTPRI" || word(8)? != 1 {
            return None;
        }
        let (space, n) = (word(12)?, word(16)?);
        if n > MAX_VOCAB || bytes.len() as u64 != 20 + 8 * u64::from(n) {
            return None;
        }
        let entries: Vec<(u32, u32)> = (0..n as usize)
            .map(|i| Some((word(20 + 8 * i)?, word(24 + 8 * i)?)))
            .collect::<Option<_>>()?;
        if entries.windows(2).any(|w| w[0].0 >= w[1].0) || entries.iter().any(|e| e.0 >= space) {
            return None;
        }
        Some(Self::new(space, entries))
    }
}

/// The adaptive text model. Its state is the session's text so far; clone it to branch.
///
/// ```
/// use unimic_codec::coder::{Decoder, Encoder};
/// use unimic_codec::entropy::AdaptiveText;
/// let turns: [&[u32]; 2] = [&[32, 5679, 306, 200_000], &[32, 5679, 306, 7]];
/// let mut enc_model = AdaptiveText::new(200_019);
/// let mut sizes = Vec::new();
/// for t in turns {
///     let mut enc = Encoder::new();
///     enc_model.encode(&mut enc, t).unwrap();
///     sizes.push(enc.finish());
/// }
/// assert!(sizes[1].len() < sizes[0].len()); // the second turn reuses the first one's ids
/// let mut dec_model = AdaptiveText::new(200_019);
/// for (t, bytes) in turns.iter().zip(&sizes) {
///     assert_eq!(&dec_model.decode(&mut Decoder::new(bytes), t.len()).unwrap(), t);
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveText {
    space: u32,
    frozen: bool,
    vocab: Vec<u32>,
    index: HashMap<u32, u32>,
    order0: Fenwick,
    order1: HashMap<u32, Counts>,
    order2: HashMap<(u32, u32), Counts>,
    pairs: usize,
    buckets: Fenwick,
    buckets_seen: u64,
    zipf: Arc<Vec<u64>>,
    /// While a trial runs ([`encode_trial`](Self::encode_trial),
    /// [`decode_trial`](Self::decode_trial)): what to undo, in order, and the scalars to restore.
    journal: Option<Journal>,
}

/// The changes of a trial, undone in reverse order by [`AdaptiveText::rollback`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Journal {
    undo: Vec<Undo>,
    pairs: usize,
    buckets_seen: u64,
}

/// How to take back one [`Counts::add`] in a context table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CountsUndo {
    /// One was added to `sym`; `created`: the context's entry was made for it; `new`: `sym` was
    /// new in it.
    Add { sym: u32, created: bool, new: bool },
    /// The entry before a change that halved it (`None`: absent).
    Was(Option<Counts>),
}

impl CountsUndo {
    /// Adds one to `sym` in the entry of `key`; returns whether the (context, symbol) pair is new,
    /// and, if `journal`, how to take it back (cheap, but a copy of the entry when it halves).
    fn add<K: std::hash::Hash + Eq + Copy>(
        table: &mut HashMap<K, Counts>,
        key: K,
        sym: u32,
        journal: bool,
    ) -> (bool, Option<CountsUndo>) {
        let before = table.get(&key);
        let created = before.is_none();
        let was = match before {
            Some(c) if journal && c.total + 1 > SPARSE_HALVE_AT => Some(c.clone()),
            _ => None,
        };
        let new = table.entry(key).or_default().add(sym);
        let undo = journal.then_some(match was {
            Some(c) => CountsUndo::Was(Some(c)),
            None => CountsUndo::Add { sym, created, new },
        });
        (new, undo)
    }

    /// Takes the change back in `table`.
    fn undo<K: std::hash::Hash + Eq + Copy>(self, table: &mut HashMap<K, Counts>, key: K) {
        match self {
            CountsUndo::Was(Some(c)) => {
                table.insert(key, c);
            }
            CountsUndo::Was(None) => {
                table.remove(&key);
            }
            CountsUndo::Add { sym, created, new } => {
                if created {
                    table.remove(&key);
                    return;
                }
                if let Some(c) = table.get_mut(&key) {
                    c.total -= 1;
                    if let Ok(i) = c.entries.binary_search_by_key(&sym, |e| e.0) {
                        if new {
                            c.entries.remove(i);
                        } else {
                            c.entries[i].1 -= 1;
                        }
                    }
                }
            }
        }
    }
}

/// One change to take back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Undo {
    /// One was added to bucket `hi`.
    Bucket(usize),
    /// `id` joined the vocabulary (last entry).
    Vocab(u32),
    /// One was added to order-0 index `i`.
    Order0(usize),
    /// Order-0 before it was regrown or halved.
    Order0Was(Fenwick),
    /// A change to the order-1 table entry of a context.
    Order1(u32, CountsUndo),
    /// A change to the order-2 table entry of a context.
    Order2((u32, u32), CountsUndo),
    /// The order-1 and order-2 tables before they were cleared.
    Cleared(HashMap<u32, Counts>, HashMap<(u32, u32), Counts>),
}

struct TokenBlend<'a> {
    v: u32,
    o2: (u64, Option<&'a Counts>),
    o1: (u64, Option<&'a Counts>),
    o0: (u64, &'a Fenwick),
    esc: u64,
}

impl WeightPrefix for TokenBlend<'_> {
    fn len(&self) -> u32 {
        self.v + 1
    }
    fn prefix(&self, i: u32) -> u64 {
        let j = i.min(self.v);
        let mut s = 0;
        for (coef, c) in [self.o2, self.o1] {
            if let Some(c) = c {
                s += coef * c.prefix(j);
            }
        }
        s += self.o0.0 * self.o0.1.prefix(j as usize);
        if i > self.v {
            s += self.esc;
        }
        s
    }
}

struct BucketBlend<'a> {
    coef: u64,
    counts: &'a Fenwick,
    coef_z: u64,
    zipf: &'a [u64],
}

impl WeightPrefix for BucketBlend<'_> {
    fn len(&self) -> u32 {
        self.counts.len() as u32
    }
    fn prefix(&self, i: u32) -> u64 {
        let i = i as usize;
        self.coef * self.counts.prefix(i) + self.coef_z * self.zipf[i.min(self.zipf.len() - 1)]
    }
}

/// The Zipf prior's prefix sums `Z(0..=n)` for the buckets of `space` (see the module docs).
/// Sessions build a model per text part, so the few spaces in use are computed once per
/// process and shared.
fn zipf_prefix(space: u32) -> Arc<Vec<u64>> {
    /// Spaces kept (a process uses one or two text id spaces).
    const KEEP: usize = 4;
    static CACHE: Mutex<Vec<(u32, Arc<Vec<u64>>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, z)) = cache.iter().find(|(s, _)| *s == space) {
        return z.clone();
    }
    let n_buckets = space.div_ceil(256) as usize;
    let mut zipf = Vec::with_capacity(n_buckets + 1);
    let mut acc = 0u64;
    zipf.push(0);
    for h in 0..n_buckets as u64 {
        acc += ONE / (h + 8);
        zipf.push(acc >> 8);
    }
    let zipf = Arc::new(zipf);
    if cache.len() >= KEEP {
        cache.remove(0);
    }
    cache.push((space, zipf.clone()));
    zipf
}

fn share(r: &mut u64, n: u64, d: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let s = *r * n / (n + d);
    *r -= s;
    (s << 16) / n
}

impl AdaptiveText {
    /// A model that has seen nothing, for ids below `space` (`>= 1`; at most `2^24`).
    pub fn new(space: u32) -> Self {
        let space = space.clamp(1, 1 << 24);
        let n_buckets = space.div_ceil(256) as usize;
        let zipf = zipf_prefix(space);
        Self {
            space,
            frozen: false,
            vocab: Vec::new(),
            index: HashMap::new(),
            order0: Fenwick::new(1024),
            order1: HashMap::new(),
            order2: HashMap::new(),
            pairs: 0,
            buckets: Fenwick::new(n_buckets),
            buckets_seen: 0,
            zipf,
            journal: None,
        }
    }

    /// A model whose vocabulary and order-0 counts start from `prior`.
    pub fn with_prior(prior: &TextPrior) -> Self {
        let mut m = Self::new(prior.space);
        for &(id, c) in &prior.entries {
            m.insert(id);
            if let Some(&i) = m.index.get(&id) {
                m.order0.add(i as usize, u64::from(c));
            }
        }
        while m.order0.total() > ORDER0_HALVE_AT {
            m.order0.halve();
        }
        m
    }

    /// The `static` text model: order-0 over `prior`, never updated.
    pub fn frozen(prior: &TextPrior) -> Self {
        let mut m = Self::with_prior(prior);
        m.frozen = true;
        m
    }

    /// The id space.
    pub fn space(&self) -> u32 {
        self.space
    }

    /// Number of ids in the vocabulary.
    pub fn vocabulary_len(&self) -> usize {
        self.vocab.len()
    }

    /// Makes room in the context tables for about `n` more ids at once (at most 4,096: `n` may
    /// come from a peer's header), instead of growing them a step at a time.
    fn reserve(&mut self, n: usize) {
        if self.frozen {
            return;
        }
        let n = n.min(4096);
        self.index.reserve(n);
        self.order1.reserve(n);
        self.order2.reserve(n);
    }

    fn insert(&mut self, id: u32) {
        if self.vocab.len() as u32 >= MAX_VOCAB || self.index.contains_key(&id) {
            return;
        }
        let i = self.vocab.len() as u32;
        self.vocab.push(id);
        self.index.insert(id, i);
        self.journal(|_| Undo::Vocab(id));
        if self.vocab.len() > self.order0.len() {
            let cap = (self.order0.len() * 2).min(MAX_VOCAB as usize);
            let mut counts: Vec<u64> = (0..self.order0.len()).map(|j| self.order0.get(j)).collect();
            counts.resize(cap, 0);
            let grown = Fenwick::from_counts(&counts);
            let was = std::mem::replace(&mut self.order0, grown);
            self.journal(|_| Undo::Order0Was(was));
        }
    }

    /// Records a change while a trial runs (`undo` is not called otherwise).
    fn journal(&mut self, undo: impl FnOnce(&Self) -> Undo) {
        if self.journal.is_some() {
            let u = undo(self);
            if let Some(j) = self.journal.as_mut() {
                j.undo.push(u);
            }
        }
    }

    /// Starts recording changes, to be undone by [`rollback`](Self::rollback).
    fn begin_trial(&mut self) {
        self.journal = Some(Journal {
            undo: Vec::new(),
            pairs: self.pairs,
            buckets_seen: self.buckets_seen,
        });
    }

    /// Undoes every change since [`begin_trial`](Self::begin_trial): the model is again exactly
    /// what it was.
    fn rollback(&mut self) {
        let Some(j) = self.journal.take() else {
            return;
        };
        for u in j.undo.into_iter().rev() {
            match u {
                Undo::Bucket(hi) => self.buckets.sub(hi, 1),
                Undo::Vocab(id) => {
                    self.vocab.pop();
                    self.index.remove(&id);
                }
                Undo::Order0(i) => self.order0.sub(i, 1),
                Undo::Order0Was(f) => self.order0 = f,
                Undo::Order1(k, c) => c.undo(&mut self.order1, k),
                Undo::Order2(k, c) => c.undo(&mut self.order2, k),
                Undo::Cleared(o1, o2) => {
                    self.order1 = o1;
                    self.order2 = o2;
                }
            }
        }
        self.pairs = j.pairs;
        self.buckets_seen = j.buckets_seen;
    }

    /// [`encode`](Self::encode), leaving the model as it was: for coding one of several
    /// independent chunks from the same state, at the cost of the tokens coded (a clone would
    /// copy every table the session has learned).
    pub fn encode_trial(&mut self, enc: &mut Encoder, ids: &[u32]) -> Result<(), CodeError> {
        self.begin_trial();
        // The update after the last id would only be undone: a one-token chunk (a streamed
        // reply's usual delta) changes nothing at all.
        let r = self.encode_ids(enc, ids, false);
        self.rollback();
        r
    }

    /// [`decode`](Self::decode), leaving the model as it was (see
    /// [`encode_trial`](Self::encode_trial)).
    pub fn decode_trial(&mut self, dec: &mut Decoder, count: usize) -> Result<Vec<u32>, CodeError> {
        self.begin_trial();
        let r = self.decode_ids(dec, count, false);
        self.rollback();
        r
    }

    fn token_blend(&self, prev: (u32, u32)) -> Quantized<TokenBlend<'_>> {
        let v = self.vocab.len() as u32;
        let mut r = ONE;
        let c2 = self.order2.get(&prev).filter(|c| c.total > 0);
        let coef2 = c2.map_or(0, |c| {
            share(&mut r, u64::from(c.total), c.entries.len() as u64)
        });
        let c1 = self.order1.get(&prev.1).filter(|c| c.total > 0);
        let coef1 = c1.map_or(0, |c| {
            share(&mut r, u64::from(c.total), c.entries.len() as u64)
        });
        let coef0 = share(&mut r, self.order0.total(), u64::from(v));
        Quantized::new(TokenBlend {
            v,
            o2: (coef2, c2),
            o1: (coef1, c1),
            o0: (coef0, &self.order0),
            esc: r << 16,
        })
    }

    fn bucket_blend(&self) -> Quantized<BucketBlend<'_>> {
        let mut r = ONE;
        let coef = share(&mut r, self.buckets.total(), self.buckets_seen);
        let z_total = self.zipf.last().copied().unwrap_or(1).max(1);
        Quantized::new(BucketBlend {
            coef,
            counts: &self.buckets,
            coef_z: ((r << 16) / z_total).max(1),
            zipf: &self.zipf,
        })
    }

    fn bucket_size(&self, hi: u32) -> u32 {
        (self.space - (hi << 8)).min(256)
    }

    fn update(&mut self, prev: (u32, u32), id: u32, escaped: bool) -> (u32, u32) {
        if self.frozen {
            return (prev.1, self.index.get(&id).copied().unwrap_or(NONE));
        }
        if escaped {
            let hi = (id >> 8) as usize;
            if self.buckets.get(hi) == 0 {
                self.buckets_seen += 1;
            }
            self.buckets.add(hi, 1);
            self.journal(|_| Undo::Bucket(hi));
        }
        self.insert(id);
        let Some(&i) = self.index.get(&id) else {
            return (prev.1, NONE);
        };
        let journal = self.journal.is_some();
        let (new2, undo2) = CountsUndo::add(&mut self.order2, prev, i, journal);
        if let Some(u) = undo2 {
            self.journal(|_| Undo::Order2(prev, u));
        }
        let (new1, undo1) = CountsUndo::add(&mut self.order1, prev.1, i, journal);
        if let Some(u) = undo1 {
            self.journal(|_| Undo::Order1(prev.1, u));
        }
        self.pairs += usize::from(new2) + usize::from(new1);
        if self.order0.total() + 1 > ORDER0_HALVE_AT {
            self.journal(|m| Undo::Order0Was(m.order0.clone()));
        } else {
            self.journal(|_| Undo::Order0(i as usize));
        }
        self.order0.add(i as usize, 1);
        if self.order0.total() > ORDER0_HALVE_AT {
            self.order0.halve();
        }
        if self.pairs > MAX_PAIRS {
            let o1 = std::mem::take(&mut self.order1);
            let o2 = std::mem::take(&mut self.order2);
            self.journal(move |_| Undo::Cleared(o1, o2));
            self.pairs = 0;
        }
        (prev.1, i)
    }

    /// Encodes one sequence (a text part or chunk), learning as it goes unless frozen.
    pub fn encode(&mut self, enc: &mut Encoder, ids: &[u32]) -> Result<(), CodeError> {
        self.encode_ids(enc, ids, true)
    }

    /// [`encode`](Self::encode); `learn_last`: whether the model learns the last id too (not
    /// when the changes are undone right after).
    fn encode_ids(
        &mut self,
        enc: &mut Encoder,
        ids: &[u32],
        learn_last: bool,
    ) -> Result<(), CodeError> {
        self.reserve(ids.len());
        let mut prev = (NONE, NONE);
        for (i, &id) in ids.iter().enumerate() {
            if id >= self.space {
                return Err(CodeError::SymbolOutOfRange {
                    symbol: id,
                    alphabet: self.space,
                });
            }
            let v = self.vocab.len() as u32;
            let sym = self.index.get(&id).copied().unwrap_or(v);
            enc.encode(sym, &self.token_blend(prev))?;
            if sym == v {
                enc.encode(id >> 8, &self.bucket_blend())?;
                enc.encode(id & 255, &Uniform::new(self.bucket_size(id >> 8)))?;
            }
            if learn_last || i + 1 < ids.len() {
                prev = self.update(prev, id, sym == v);
            }
        }
        Ok(())
    }

    /// Decodes a sequence of `count` ids. Returns an error if the payload decodes to an id
    /// outside the id space.
    pub fn decode(&mut self, dec: &mut Decoder, count: usize) -> Result<Vec<u32>, CodeError> {
        self.decode_ids(dec, count, true)
    }

    /// [`decode`](Self::decode); `learn_last` as for [`encode_ids`](Self::encode_ids).
    fn decode_ids(
        &mut self,
        dec: &mut Decoder,
        count: usize,
        learn_last: bool,
    ) -> Result<Vec<u32>, CodeError> {
        let mut out = Vec::with_capacity(count.min(1 << 16));
        self.reserve(count);
        let mut prev = (NONE, NONE);
        for i in 0..count {
            let v = self.vocab.len() as u32;
            let sym = dec.decode(&self.token_blend(prev))?;
            let id = if sym == v {
                let hi = dec.decode(&self.bucket_blend())?;
                let lo = dec.decode(&Uniform::new(self.bucket_size(hi)))?;
                (hi << 8) | lo
            } else {
                *self.vocab.get(sym as usize).ok_or(CodeError::InvalidData)?
            };
            if id >= self.space {
                return Err(CodeError::InvalidData);
            }
            if learn_last || i + 1 < count {
                prev = self.update(prev, id, sym == v);
            }
            out.push(id);
        }
        Ok(out)
    }

    /// Learns a sequence without coding it (text the session context already holds).
    pub fn learn(&mut self, ids: &[u32]) {
        self.reserve(ids.len());
        let mut prev = (NONE, NONE);
        let space = self.space;
        for &id in ids.iter().filter(|&&id| id < space) {
            let escaped = !self.index.contains_key(&id);
            prev = self.update(prev, id, escaped);
        }
    }
}

#[cfg(test)]
mod trial_tests {
    use super::*;
    use proptest::prelude::*;

    /// Codes `ids` from `model` the plain way (on a copy) and as a trial; both give the same
    /// bytes, decode back the same way, and the trial leaves the model exactly as it was.
    fn check(model: &mut AdaptiveText, ids: &[u32]) {
        let before = model.clone();
        let mut plain = Encoder::new();
        before.clone().encode(&mut plain, ids).unwrap();
        let plain = plain.finish();
        let mut trial = Encoder::new();
        model.encode_trial(&mut trial, ids).unwrap();
        assert_eq!(trial.finish(), plain, "trial payload");
        assert!(*model == before, "the encode trial changed the model");
        let decoded = model
            .decode_trial(&mut Decoder::new(&plain), ids.len())
            .unwrap();
        assert_eq!(decoded, ids);
        assert!(*model == before, "the decode trial changed the model");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn a_trial_codes_like_a_copy_and_leaves_the_model_unchanged(
            context in proptest::collection::vec(prop_oneof![0u32..20, 0u32..3000], 0..2000),
            chunk in proptest::collection::vec(
                prop_oneof![0u32..20, 0u32..3000, 0u32..200_019],
                0..64,
            ),
        ) {
            let mut model = AdaptiveText::new(200_019);
            model.learn(&context);
            check(&mut model, &chunk);
        }
    }

    #[test]
    fn a_trial_that_grows_the_vocabulary_past_its_table_is_undone() {
        let mut model = AdaptiveText::new(200_019);
        model.learn(&(0..1020).collect::<Vec<_>>());
        let before_len = model.order0.len();
        // 40 new ids: order-0 regrows from 1,024 entries during the trial.
        check(&mut model, &(5000..5040).collect::<Vec<_>>());
        assert_eq!(model.order0.len(), before_len);
    }

    #[test]
    fn a_trial_that_halves_order_0_or_a_context_is_undone() {
        // Order-0 just below its halving threshold.
        let prior = TextPrior::new(1000, vec![(7, (ORDER0_HALVE_AT - 2) as u32), (9, 1)]);
        let mut model = AdaptiveText::with_prior(&prior);
        assert!(model.order0.total() > ORDER0_HALVE_AT - 4);
        check(&mut model, &[7, 9, 7, 7, 9, 3]);
        // An order-1 context just below its halving threshold.
        let mut model = AdaptiveText::new(1000);
        let pairs: Vec<u32> = (0..SPARSE_HALVE_AT - 1).flat_map(|i| [5, i % 50]).collect();
        model.learn(&pairs);
        check(&mut model, &[5, 1, 5, 2, 5, 3, 5, 60]);
    }
}
