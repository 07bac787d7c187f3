//! [`SessionContext`]: the token sequences exchanged in a session, by (message id, part index),
//! with the context digest and deterministic, memory-bounded eviction.
//!
//! # Digest (normative; docs/PROTOCOL.md refers here)
//! ```text
//! digest = SHA-256( "unimic-context-v1"                      (17 ASCII bytes)
//!                 || varint(N)                               (number of references)
//!                 || for each reference, in the order the part lists them:
//!                      varint(message_id) || varint(part_index) || varint(kind)
//!                      || varint(rows) || varint(cols) || rows*cols ids, each u32 little-endian )
//! ```
//! `kind` 0 = text ids (`rows = 1`, `cols` = count), 1 = image grid (`rows` = height,
//! `cols` = width); `varint` is the QUIC variable-length integer (RFC 9000 §16, shortest form).
//!
//! # Memory bound and eviction
//! Each stored sequence costs [`BYTES_PER_SEQUENCE`] bytes of the budget, plus
//! [`BYTES_PER_TOKEN`] per token (so parts with few or no tokens cannot grow a context without
//! bound: each entry's bookkeeping costs memory too). Inserting a sequence that
//! takes the total above the budget evicts the oldest stored sequences (insertion order) until it
//! fits again; [`SessionContext::evict`] removes one explicitly. Both are deterministic, so two
//! ends that apply the same inserts and evictions in the same order hold the same context, and
//! both report what they evicted (transport announces it with a ContextEvicted notice).
//!
//! ```
//! use unimic_codec::context::{ContextKey, Sequence, SessionContext};
//! let mut a = SessionContext::new(1 << 20);
//! let mut b = SessionContext::new(1 << 20);
//! let key = ContextKey::new(1, 0);
//! for ctx in [&mut a, &mut b] {
//!     ctx.insert(key, Sequence::text(vec![32, 5679, 306])).unwrap();
//! }
//! let d = a.digest(&[key]).unwrap();
//! assert!(b.verify(&[key], &d).is_ok());
//! assert!(b.verify(&[key], &[0; 32]).is_err());
//! ```

use crate::grid::TokenGrid;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use thiserror::Error;

/// Budget bytes charged per stored token.
pub const BYTES_PER_TOKEN: u64 = 4;
/// Budget bytes charged per stored sequence, whatever its length (about what an entry's
/// bookkeeping takes in memory here).
pub const BYTES_PER_SEQUENCE: u64 = 128;
/// Domain separator at the start of the digest input.
pub const DIGEST_DOMAIN: &[u8; 17] = b"unimic-context-v1";
/// Budget of [`SessionContext::default`]: 64 MiB (16 Mi tokens).
pub const DEFAULT_BUDGET_BYTES: u64 = 64 << 20;

/// Largest value a QUIC varint holds (`2^62 - 1`).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `v` as a QUIC variable-length integer (RFC 9000 §16), shortest form. Values above
/// [`VARINT_MAX`] are clamped to it (callers validate first).
pub fn write_varint(out: &mut Vec<u8>, v: u64) {
    let v = v.min(VARINT_MAX);
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xC000_0000_0000_0000).to_be_bytes());
    }
}

/// Identifies a stored sequence: a part of a message of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContextKey {
    /// The message id.
    pub message_id: u64,
    /// The part's index in the message.
    pub part_index: u64,
}

impl ContextKey {
    /// A key.
    pub fn new(message_id: u64, part_index: u64) -> Self {
        Self {
            message_id,
            part_index,
        }
    }
}

/// What a stored sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SequenceKind {
    /// Text token ids (kind 0).
    Text,
    /// An image token grid (kind 1).
    Grid,
}

impl SequenceKind {
    /// The kind's number in the digest and on the wire.
    pub fn code(self) -> u64 {
        match self {
            SequenceKind::Text => 0,
            SequenceKind::Grid => 1,
        }
    }
}

/// A token sequence kept in the context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sequence {
    kind: SequenceKind,
    rows: u32,
    cols: u32,
    ids: Arc<[u32]>,
    /// Quality-ladder level: 1 for text and base images, `l` for a refinement part of level `l`
    /// (PROTOCOL.md §6.3, mode 5). Not covered by the digest: both ends learn it from the part
    /// header.
    level: u8,
}

impl Sequence {
    /// Text token ids (`rows = 1`, `cols = ids.len()`).
    pub fn text(ids: Vec<u32>) -> Self {
        Self {
            kind: SequenceKind::Text,
            rows: 1,
            cols: ids.len() as u32,
            ids: ids.into(),
            level: 1,
        }
    }

    /// An image token grid.
    pub fn grid(grid: &TokenGrid) -> Self {
        Self {
            kind: SequenceKind::Grid,
            rows: grid.height(),
            cols: grid.width(),
            ids: grid.ids().into(),
            level: 1,
        }
    }

    /// Refinement level `level` (2 ..= 16) of a quality ladder: a grid of residual codes that
    /// refines the image part it references (PROTOCOL.md §6.3, mode 5). Levels outside that range
    /// are clamped into it.
    pub fn refinement(grid: &TokenGrid, level: u32) -> Self {
        Self {
            level: level.clamp(2, 16) as u8,
            ..Self::grid(grid)
        }
    }

    /// The quality-ladder level: 1 for text and base images.
    pub fn level(&self) -> u32 {
        u32::from(self.level)
    }

    /// Kind.
    pub fn kind(&self) -> SequenceKind {
        self.kind
    }
    /// Rows (1 for text).
    pub fn rows(&self) -> u32 {
        self.rows
    }
    /// Columns (the count for text).
    pub fn cols(&self) -> u32 {
        self.cols
    }
    /// The ids, row-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
    /// Budget bytes this sequence costs: [`BYTES_PER_SEQUENCE`] plus [`BYTES_PER_TOKEN`] per
    /// token.
    pub fn cost(&self) -> u64 {
        BYTES_PER_SEQUENCE + self.ids.len() as u64 * BYTES_PER_TOKEN
    }
}

/// Why a context operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContextError {
    /// A referenced sequence is not (or no longer) in the context.
    #[error("context reference ({}, {}) is not in the session context", .0.message_id, .0.part_index)]
    Missing(ContextKey),
    /// The digest the sender computed differs from ours: refuse before decoding.
    #[error("context digest mismatch: the two ends hold different context")]
    DigestMismatch {
        /// The digest in the part.
        expected: [u8; 32],
        /// The digest over our context.
        actual: [u8; 32],
    },
    /// The key is already stored.
    #[error("context key ({}, {}) is already stored", .0.message_id, .0.part_index)]
    Duplicate(ContextKey),
    /// A key does not fit a QUIC varint.
    #[error("context key ({}, {}) exceeds 2^62-1", .0.message_id, .0.part_index)]
    KeyRange(ContextKey),
    /// The sequence alone exceeds the budget.
    #[error("sequence of {cost} bytes exceeds the context budget of {budget} bytes")]
    TooLarge {
        /// Bytes the sequence costs.
        cost: u64,
        /// The budget.
        budget: u64,
    },
}

/// The session context: stored sequences, their insertion order, and the byte budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionContext {
    entries: BTreeMap<ContextKey, (u64, Sequence)>,
    order: VecDeque<(u64, ContextKey)>,
    next_seq: u64,
    used: u64,
    budget: u64,
    /// Sequences removed so far (evicted or taken out): while it stays the same, every key
    /// that was present still holds what it held (a key is never stored twice at once).
    removals: u64,
    memo: DigestMemo,
}

/// Entries a [`DigestMemo`] keeps.
const MEMO_ENTRIES: usize = 8;

/// The most recent digests, each with the references it covers and the insertion number of each
/// referenced sequence (unique per insertion, so equal numbers mean the same stored content): a
/// streamed part that codes many chunks against the same references hashes them once, not per
/// chunk. Not part of the context's value (clones start empty; equality ignores it).
#[derive(Debug, Default)]
struct DigestMemo(std::sync::Mutex<VecDeque<Remembered>>);

/// A remembered digest: the references with the insertion number of each, the context's
/// removal count then, and the digest.
type Remembered = (Vec<(ContextKey, u64)>, u64, [u8; 32]);

impl Clone for DigestMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for DigestMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for DigestMemo {}

impl Default for SessionContext {
    /// An empty context with [`DEFAULT_BUDGET_BYTES`].
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET_BYTES)
    }
}

impl SessionContext {
    /// An empty context holding at most `budget_bytes` (see [`Sequence::cost`]).
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            used: 0,
            budget: budget_bytes,
            removals: 0,
            memo: DigestMemo::default(),
        }
    }

    /// Stores a sequence; evicts the oldest sequences if the budget is exceeded and returns
    /// their keys, oldest first.
    pub fn insert(
        &mut self,
        key: ContextKey,
        seq: Sequence,
    ) -> Result<Vec<ContextKey>, ContextError> {
        if key.message_id > VARINT_MAX || key.part_index > VARINT_MAX {
            return Err(ContextError::KeyRange(key));
        }
        if self.entries.contains_key(&key) {
            return Err(ContextError::Duplicate(key));
        }
        let cost = seq.cost();
        if cost > self.budget {
            return Err(ContextError::TooLarge {
                cost,
                budget: self.budget,
            });
        }
        let mut evicted = Vec::new();
        while self.used + cost > self.budget {
            let Some((n, k)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&k).is_some_and(|e| e.0 == n) {
                self.remove(&k);
                evicted.push(k);
            }
        }
        let n = self.next_seq;
        self.next_seq += 1;
        self.used += cost;
        self.entries.insert(key, (n, seq));
        self.order.push_back((n, key));
        Ok(evicted)
    }

    fn remove(&mut self, key: &ContextKey) -> Option<Sequence> {
        let (_, seq) = self.entries.remove(key)?;
        self.removals += 1;
        self.used -= seq.cost();
        Some(seq)
    }

    /// Removes one sequence explicitly; returns whether it was present.
    pub fn evict(&mut self, key: ContextKey) -> bool {
        let present = self.remove(&key).is_some();
        if self.entries.is_empty() {
            self.order.clear();
        }
        present
    }

    /// The stored sequence under `key`.
    pub fn get(&self, key: ContextKey) -> Option<&Sequence> {
        self.entries.get(&key).map(|e| &e.1)
    }

    /// Keys currently stored, in insertion order (oldest first).
    pub fn keys(&self) -> Vec<ContextKey> {
        let mut v: Vec<(u64, ContextKey)> = self.entries.iter().map(|(k, e)| (e.0, *k)).collect();
        v.sort_unstable();
        v.into_iter().map(|e| e.1).collect()
    }

    /// Number of stored sequences.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Budget bytes in use.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// The budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// The referenced sequences, in order.
    pub fn resolve(&self, refs: &[ContextKey]) -> Result<Vec<&Sequence>, ContextError> {
        refs.iter()
            .map(|&k| self.get(k).ok_or(ContextError::Missing(k)))
            .collect()
    }

    /// The context digest over `refs` (see the [module docs](self)).
    pub fn digest(&self, refs: &[ContextKey]) -> Result<[u8; 32], ContextError> {
        // The memo first, without allocating: what a streamed part's every chunk asks.
        if let Ok(memo) = self.memo.0.lock() {
            let same = |r: &[(ContextKey, u64)], removals: u64| {
                r.len() == refs.len()
                    && r.iter().map(|e| &e.0).eq(refs.iter())
                    // Nothing removed since: the same keys hold the same sequences. Otherwise
                    // each must still be the sequence stored then.
                    && (removals == self.removals
                        || r.iter().all(|(k, stamp)| {
                            self.entries.get(k).is_some_and(|e| e.0 == *stamp)
                        }))
            };
            if let Some((_, _, d)) = memo.iter().find(|(r, n, _)| same(r, *n)) {
                return Ok(*d);
            }
        }
        let seqs = self.resolve(refs)?;
        let stamped: Vec<(ContextKey, u64)> = refs
            .iter()
            .map(|k| (*k, self.entries.get(k).map_or(u64::MAX, |e| e.0)))
            .collect();
        let digest = Self::hash(refs, &seqs);
        if let Ok(mut memo) = self.memo.0.lock() {
            if memo.len() >= MEMO_ENTRIES {
                memo.pop_front();
            }
            memo.push_back((stamped, self.removals, digest));
        }
        Ok(digest)
    }

    /// The digest's hash over resolved sequences (PROTOCOL.md §8).
    fn hash(refs: &[ContextKey], seqs: &[&Sequence]) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(DIGEST_DOMAIN);
        write_varint(&mut buf, refs.len() as u64);
        for (key, seq) in refs.iter().zip(seqs) {
            for v in [
                key.message_id,
                key.part_index,
                seq.kind.code(),
                u64::from(seq.rows),
                u64::from(seq.cols),
            ] {
                write_varint(&mut buf, v);
            }
            h.update(&buf);
            buf.clear();
            let mut ids = Vec::with_capacity(seq.ids.len() * 4);
            for id in seq.ids.iter() {
                ids.extend_from_slice(&id.to_le_bytes());
            }
            h.update(&ids);
        }
        h.update(&buf);
        h.finalize().into()
    }

    /// Checks that our digest over `refs` equals `expected`; refuse to decode otherwise.
    pub fn verify(&self, refs: &[ContextKey], expected: &[u8; 32]) -> Result<(), ContextError> {
        let actual = self.digest(refs)?;
        if &actual != expected {
            return Err(ContextError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_matches_rfc9000_examples() {
        let cases: [(u64, &[u8]); 4] = [
            (37, &[0x25]),
            (15_293, &[0x7b, 0xbd]),
            (494_878_333, &[0x9d, 0x7f, 0x3e, 0x7d]),
            (
                151_288_809_941_952_652,
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            ),
        ];
        for (v, bytes) in cases {
            let mut out = Vec::new();
            write_varint(&mut out, v);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn remembered_digests_follow_the_stored_content() {
        let (a, b) = (ContextKey::new(0, 0), ContextKey::new(1, 0));
        let mut ctx = SessionContext::default();
        ctx.insert(a, Sequence::text(vec![1, 2, 3])).unwrap();
        ctx.insert(b, Sequence::text(vec![4])).unwrap();
        let fresh = |ctx: &SessionContext, refs: &[ContextKey]| {
            SessionContext::hash(refs, &ctx.resolve(refs).unwrap())
        };
        for _ in 0..3 {
            assert_eq!(ctx.digest(&[a, b]).unwrap(), fresh(&ctx, &[a, b]));
            assert_eq!(ctx.digest(&[b]).unwrap(), fresh(&ctx, &[b]));
        }
        // The same key stored again with other content: the remembered digest is not reused.
        let before = ctx.digest(&[a, b]).unwrap();
        assert!(ctx.evict(a));
        assert!(ctx.digest(&[a, b]).is_err());
        ctx.insert(a, Sequence::text(vec![9, 9])).unwrap();
        let after = ctx.digest(&[a, b]).unwrap();
        assert_ne!(after, before);
        assert_eq!(after, fresh(&ctx, &[a, b]));
        // A removal elsewhere: what is remembered for the keys still there still holds.
        let c = ContextKey::new(2, 0);
        ctx.insert(c, Sequence::text(vec![5])).unwrap();
        assert!(ctx.evict(c));
        assert_eq!(ctx.digest(&[a, b]).unwrap(), after);
        assert_eq!(ctx.digest(&[b]).unwrap(), fresh(&ctx, &[b]));
        // Clones and equality ignore what is remembered.
        assert_eq!(ctx.clone(), ctx);
        assert_eq!(ctx.clone().digest(&[b]).unwrap(), fresh(&ctx, &[b]));
    }

    #[test]
    fn empty_reference_list_digest_is_fixed() {
        // SHA-256("unimic-context-v1" || 0x00)
        let d = SessionContext::new(0).digest(&[]).unwrap();
        let mut input = DIGEST_DOMAIN.to_vec();
        input.push(0);
        let want: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(d, want);
    }

    #[test]
    fn eviction_is_oldest_first_and_reported() {
        // Room for two 4-token parts (128 + 16 bytes each), not three.
        let mut c = SessionContext::new(2 * (BYTES_PER_SEQUENCE + 16) + 40);
        c.insert(ContextKey::new(1, 0), Sequence::text(vec![1; 4]))
            .unwrap();
        c.insert(ContextKey::new(2, 0), Sequence::text(vec![2; 4]))
            .unwrap();
        let ev = c
            .insert(ContextKey::new(3, 0), Sequence::text(vec![3; 4]))
            .unwrap();
        assert_eq!(ev, vec![ContextKey::new(1, 0)]);
        assert_eq!(c.used_bytes(), 2 * (BYTES_PER_SEQUENCE + 16));
        assert!(matches!(
            c.digest(&[ContextKey::new(1, 0)]),
            Err(ContextError::Missing(_))
        ));
        assert!(c.evict(ContextKey::new(3, 0)));
        assert!(!c.evict(ContextKey::new(3, 0)));
        assert_eq!(c.keys(), vec![ContextKey::new(2, 0)]);
        assert!(matches!(
            c.insert(ContextKey::new(9, 0), Sequence::text(vec![0; 83])),
            Err(ContextError::TooLarge { .. })
        ));
        // Parts without tokens cost their entry: no more of them fit than the budget pays for.
        let mut c = SessionContext::new(10 * BYTES_PER_SEQUENCE);
        for i in 0..100 {
            c.insert(ContextKey::new(i, 0), Sequence::text(Vec::new()))
                .unwrap();
            assert!(c.len() <= 10);
        }
        assert_eq!(c.len(), 10);
        assert_eq!(c.keys()[0], ContextKey::new(90, 0));
    }
}
