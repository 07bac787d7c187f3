//! The order of the peer's message ids (PROTOCOL.md §5): a sender numbers its messages with
//! strictly increasing ids, in the order it opens the streams that carry them, and never reuses
//! one. The receiver checks this as headers arrive, in whatever order it reads them, with bounded
//! memory.
//!
//! Headers may be read out of stream order (a later stream's first bytes can arrive first), so
//! each header is checked against its neighbours by stream: the nearest earlier stream must carry
//! a smaller id, the nearest later one a larger id. Only the most recent `window` streams are
//! remembered; everything older is summarised by the newest forgotten (stream, id) pair. A
//! sender cannot hold more than `max_concurrent_messages` streams open, and a stream stays open
//! until its header has been read, so with a window of at least twice that limit no honest header
//! arrives on a stream older than the window.

use std::collections::BTreeMap;

/// The peer's message ids seen so far, by the index of the stream that carried them.
#[derive(Debug)]
pub(crate) struct PeerIds {
    recent: BTreeMap<u64, u64>,
    /// The newest (stream, id) pair forgotten: every later header must be on a newer stream
    /// with a larger id.
    floor: Option<(u64, u64)>,
    window: usize,
}

impl PeerIds {
    /// Remembers the last `window` streams (at least 1,024 and twice `max_concurrent`).
    pub(crate) fn new(max_concurrent: u64) -> Self {
        let window = usize::try_from(max_concurrent.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .clamp(1024, 1 << 20);
        Self {
            recent: BTreeMap::new(),
            floor: None,
            window,
        }
    }

    /// Admits the message `id` read on the peer's stream number `stream`, or says which rule it
    /// breaks.
    pub(crate) fn admit(&mut self, stream: u64, id: u64) -> Result<(), &'static str> {
        if let Some((s, i)) = self.floor {
            if stream <= s {
                return Err("message stream older than the receiver's window of open streams");
            }
            if id <= i {
                return Err("message id reused or not above an earlier stream's message id");
            }
        }
        if self.recent.contains_key(&stream) {
            return Err("a second message header on one stream");
        }
        if let Some((_, &before)) = self.recent.range(..stream).next_back() {
            if id <= before {
                return Err("message id reused or not above an earlier stream's message id");
            }
        }
        if let Some((_, &after)) = self.recent.range(stream..).next() {
            if id >= after {
                return Err("message id reused or not below a later stream's message id");
            }
        }
        self.recent.insert(stream, id);
        while self.recent.len() > self.window {
            self.floor = self.recent.pop_first();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn increasing_ids_in_any_read_order_are_admitted() {
        let mut p = PeerIds::new(16);
        // Streams 0..4 carry ids 2, 4, 8, 10; headers read out of order.
        for (s, id) in [(2, 8), (0, 2), (3, 10), (1, 4)] {
            assert_eq!(p.admit(s, id), Ok(()), "stream {s} id {id}");
        }
    }

    #[test]
    fn reused_and_decreasing_ids_are_refused() {
        let mut p = PeerIds::new(16);
        p.admit(0, 2).unwrap();
        assert!(p.admit(1, 2).is_err(), "reused on a later stream");
        p.admit(1, 6).unwrap();
        assert!(p.admit(2, 4).is_err(), "below an earlier stream's");
        assert!(p.admit(5, 6).is_err(), "reused");
        p.admit(5, 20).unwrap();
        assert!(p.admit(3, 22).is_err(), "above a later stream's");
        assert!(p.admit(3, 20).is_err(), "equal to a later stream's");
        p.admit(3, 10).unwrap();
    }

    #[test]
    fn the_window_forgets_old_streams_but_keeps_their_order() {
        let mut p = PeerIds::new(1);
        for s in 0..2000u64 {
            p.admit(s, 2 * s + 2).unwrap();
        }
        assert!(p.recent.len() <= 1024);
        assert!(
            p.admit(10, 100_000).is_err(),
            "a stream older than the window"
        );
        assert!(
            p.admit(2000, 4).is_err(),
            "an id at or below a forgotten one"
        );
        p.admit(2000, 4002).unwrap();
    }

    proptest! {
        /// Whatever order headers are read in, an honest numbering is admitted whole, and one
        /// duplicated id anywhere is refused once.
        #[test]
        fn honest_numberings_pass_and_a_duplicate_does_not(
            gaps in proptest::collection::vec(1u64..5, 1..60),
            order in any::<proptest::sample::Index>(),
            dup in any::<proptest::sample::Index>(),
        ) {
            let mut ids = Vec::new();
            let mut id = 0;
            for g in &gaps {
                id += 2 * g;
                ids.push(id);
            }
            let mut reads: Vec<u64> = (0..ids.len() as u64).collect();
            let k = order.index(reads.len());
            reads.rotate_left(k);
            let mut p = PeerIds::new(16);
            for &s in &reads {
                prop_assert_eq!(p.admit(s, ids[s as usize]), Ok(()));
            }
            let d = ids[dup.index(ids.len())];
            prop_assert!(p.admit(ids.len() as u64, d).is_err());
        }
    }
}
