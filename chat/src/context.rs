//! Which earlier parts a new part is coded against (context reuse): the most recent parts of the
//! same kind that both ends still hold.

use std::collections::VecDeque;
use std::sync::Arc;

use unimic_transport::{ContextKey, Session, TokenGrid};

/// Parts a new part references at most (each costs hashing at every chunk; the adaptive models
/// learn them in order, and a list that grows by appending reuses the learned state).
pub(crate) const MAX_REFS: usize = 16;

/// What kind of sequence a context entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Image,
}

/// The parts of the conversation in order, with their kinds (and an image's grid, which the
/// rows of an edit streamed against it are drawn on).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    entries: VecDeque<(ContextKey, Kind)>,
    grids: VecDeque<(ContextKey, Arc<TokenGrid>)>,
}

impl Tracker {
    /// Records an image part both ends now hold, with its grid.
    pub fn record_image(&mut self, key: ContextKey, grid: Arc<TokenGrid>) {
        self.record(key, Kind::Image);
        self.grids.push_back((key, grid));
        while self.grids.len() > MAX_REFS {
            self.grids.pop_front();
        }
    }

    /// The grid of a recent image part, if it is still known here.
    pub fn grid(&self, key: ContextKey) -> Option<Arc<TokenGrid>> {
        self.grids
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, g)| g.clone())
    }

    /// Records a part both ends now hold (sent and written, or received and decoded).
    pub fn record(&mut self, key: ContextKey, kind: Kind) {
        self.entries.push_back((key, kind));
        // Bounded: older entries than this are never referenced.
        while self.entries.len() > 4 * MAX_REFS {
            self.entries.pop_front();
        }
    }

    /// The most recent parts of `kind` still in the session context (evictions dropped),
    /// oldest first.
    pub fn refs(&self, session: &Session, kind: Kind) -> Vec<ContextKey> {
        // One lookup per recent entry (at most `4 · MAX_REFS`), not a pass over the whole
        // context, which may hold thousands of short parts.
        let mut refs: Vec<ContextKey> = self
            .entries
            .iter()
            .rev()
            .filter(|(k, kd)| *kd == kind && session.context_holds(*k))
            .map(|(k, _)| *k)
            .take(MAX_REFS)
            .collect();
        refs.reverse();
        refs
    }
}
