//! The conversation a served session's agent sees, bounded ([`HistoryLimits`]): the newest turns
//! that fit, with the context key of each piece both ends hold and where each refinement level
//! went.
//!
//! Without a bound a client could grow a server's memory without end, one turn at a time, each
//! turn within every transport limit (a raw attachment of up to `max_message_bytes` per turn), and
//! a pixel agent would send an ever longer history to its model. The session context has its own
//! budget (`Limits::max_context_bytes`, evicting oldest first); this is the agent's side of it.

use std::collections::{HashMap, VecDeque};

use unimic_agents::{Content, Conversation, Turn};
use unimic_transport::ContextKey;

/// How much of a session's conversation the server keeps for its agent: the newest turns, as
/// many as fit both bounds. The turn being answered is always kept, whatever its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most turns kept (client and agent turns alike; 256).
    pub max_turns: usize,
    /// Most bytes of content kept, counted as [`content_bytes`] does (16 MiB: the default
    /// session context budget).
    pub max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_turns: 256,
            max_bytes: 16 << 20,
        }
    }
}

/// What each piece of content costs the history besides its data (about what it takes in
/// memory), so that a turn of thousands of empty parts is not free.
pub const BYTES_PER_CONTENT: usize = 64;

/// What a piece of content costs the history: [`BYTES_PER_CONTENT`] plus, for text, its UTF-8
/// bytes and 4 per token id; for an image, 4 bytes per token of every level; for a raw
/// attachment, its bytes; for a request, its JSON.
pub fn content_bytes(content: &Content) -> usize {
    BYTES_PER_CONTENT
        + match content {
            Content::Text { text, ids } => text.len() + 4 * ids.as_ref().map_or(0, Vec::len),
            Content::Image(grid) => 4 * grid.len(),
            Content::ImageLevels(levels) => levels.iter().map(|g| 4 * g.len()).sum(),
            Content::Raw { bytes, .. } => bytes.len(),
            Content::Request(r) => r.to_json().len(),
            // `Content` is non-exhaustive: a variant added later counts its debug form.
            other => format!("{other:?}").len(),
        }
}

/// A served session's conversation, bounded by [`HistoryLimits`].
#[derive(Debug, Default)]
pub(crate) struct History {
    limits: HistoryLimits,
    /// What the agent sees.
    conversation: Conversation,
    /// Per turn of `conversation`, per content: the context key both ends hold it under (`None`
    /// for a raw part, or a reply piece the client was not sent as a part).
    keys: VecDeque<Vec<Option<ContextKey>>>,
    /// Per turn of `conversation`: its bytes ([`content_bytes`] summed).
    sizes: VecDeque<usize>,
    bytes: usize,
    /// Turns dropped from the front so far: turn `t` of `conversation` is turn `first + t` of
    /// the session.
    first: usize,
    /// Where each received refinement level went: (session turn, content index).
    refined: HashMap<ContextKey, (usize, usize)>,
}

impl History {
    pub fn new(limits: HistoryLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// The conversation to hand the agent.
    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    /// The context keys of the conversation's pieces, by turn and content index.
    pub fn keys(&self) -> &VecDeque<Vec<Option<ContextKey>>> {
        &self.keys
    }

    /// Bytes the kept turns hold ([`content_bytes`]).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends a turn (its contents and their keys), then drops the oldest turns until the
    /// limits hold again (never the one just added).
    pub fn push(&mut self, turn: Turn, keys: Vec<Option<ContextKey>>) {
        let size = turn.content.iter().map(content_bytes).sum();
        self.conversation.turns.push(turn);
        self.keys.push_back(keys);
        self.sizes.push_back(size);
        self.bytes += size;
        self.trim();
    }

    /// Where refinements of the image under `base` go: the image itself, or the image that an
    /// earlier refinement `base` sharpened. Positions are the conversation's (turn, content).
    fn locate(&self, base: ContextKey) -> Option<(usize, usize)> {
        if let Some(&(t, c)) = self.refined.get(&base) {
            return t.checked_sub(self.first).map(|t| (t, c));
        }
        self.keys
            .iter()
            .enumerate()
            .find_map(|(t, turn)| turn.iter().position(|k| *k == Some(base)).map(|c| (t, c)))
    }

    /// Adds refinement level `level` (`grid`, received under `key`) to the image under `base`
    /// (docs/PROTOCOL.md §6.3 mode 5): the image becomes [`Content::ImageLevels`]; a second
    /// refinement of the same level replaces the first and the levels above it. Returns false,
    /// changing nothing, when the history does not hold that image (never sent, or dropped).
    pub fn refine(
        &mut self,
        key: ContextKey,
        base: ContextKey,
        level: u32,
        grid: &unimic_transport::TokenGrid,
    ) -> bool {
        let Some((t, c)) = self.locate(base) else {
            return false;
        };
        let Some(content) = self
            .conversation
            .turns
            .get_mut(t)
            .and_then(|turn| turn.content.get_mut(c))
        else {
            return false;
        };
        let before = content_bytes(content);
        let below = (level as usize).saturating_sub(1);
        match content {
            Content::Image(g) => *content = Content::ImageLevels(vec![g.clone(), grid.clone()]),
            Content::ImageLevels(levels) if levels.len() >= below => {
                levels.truncate(below);
                levels.push(grid.clone());
            }
            _ => return false,
        }
        let after = content_bytes(content);
        self.sizes[t] = self.sizes[t] + after - before;
        self.bytes = self.bytes + after - before;
        self.refined.insert(key, (self.first + t, c));
        // The newest turn is the one being answered: keep it even if this made it too large.
        self.trim();
        true
    }

    /// Drops the oldest turns while more than the limits are kept, leaving at least one.
    fn trim(&mut self) {
        let mut drop = 0;
        let (mut turns, mut bytes) = (self.sizes.len(), self.bytes);
        while turns > 1 && (turns > self.limits.max_turns || bytes > self.limits.max_bytes) {
            bytes -= self.sizes[drop];
            drop += 1;
            turns -= 1;
        }
        if drop == 0 {
            return;
        }
        self.conversation.turns.drain(..drop);
        self.keys.drain(..drop);
        self.sizes.drain(..drop);
        self.bytes = bytes;
        self.first += drop;
        let first = self.first;
        self.refined.retain(|_, (t, _)| *t >= first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimic_agents::Role;
    use unimic_transport::TokenGrid;

    fn text_turn(s: &str) -> Turn {
        Turn {
            role: Role::User,
            content: vec![Content::Text {
                text: s.into(),
                ids: None,
            }],
        }
    }

    fn image_turn(side: u32) -> Turn {
        let grid = TokenGrid::new(side, side, 1024, vec![1; (side * side) as usize]).unwrap();
        Turn {
            role: Role::User,
            content: vec![Content::Image(grid)],
        }
    }

    #[test]
    fn keeps_the_newest_turns_within_both_limits() {
        let mut h = History::new(HistoryLimits {
            max_turns: 3,
            max_bytes: 1000,
        });
        for i in 0..10 {
            h.push(text_turn(&format!("turn {i}")), vec![None]);
        }
        let texts: Vec<String> = h
            .conversation()
            .turns
            .iter()
            .map(|t| match &t.content[0] {
                Content::Text { text, .. } => text.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(texts, ["turn 7", "turn 8", "turn 9"]);
        assert_eq!(h.keys().len(), 3);
        assert_eq!(h.bytes(), 3 * (64 + 6));
        // A 16×16 image costs 64 + 1,024 bytes: more than the budget, yet kept, as the turn
        // being answered.
        h.push(image_turn(16), vec![Some(ContextKey::new(20, 0))]);
        assert_eq!(h.conversation().turns.len(), 1);
        h.push(image_turn(8), vec![Some(ContextKey::new(22, 0))]);
        assert_eq!(h.conversation().turns.len(), 1);
        assert_eq!(h.bytes(), 64 + 256);
        assert_eq!(h.keys()[0], vec![Some(ContextKey::new(22, 0))]);
    }

    #[test]
    fn refinements_follow_their_image_and_leave_with_it() {
        let mut h = History::new(HistoryLimits {
            max_turns: 2,
            max_bytes: 1 << 20,
        });
        let base = ContextKey::new(4, 0);
        h.push(image_turn(4), vec![Some(base)]);
        h.push(text_turn("a"), vec![None]);
        let level2 = TokenGrid::new(4, 4, 1024, vec![2; 16]).unwrap();
        let level3 = TokenGrid::new(4, 4, 1024, vec![3; 16]).unwrap();
        assert!(h.refine(ContextKey::new(6, 0), base, 2, &level2));
        // A level 3 that names the level-2 part as its base reaches the same image.
        assert!(h.refine(ContextKey::new(8, 0), ContextKey::new(6, 0), 3, &level3));
        match &h.conversation().turns[0].content[0] {
            Content::ImageLevels(levels) => assert_eq!(levels.len(), 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.bytes(), (64 + 3 * 64) + (64 + 1));
        // Two more turns push the image out; a later refinement of it finds nothing.
        h.push(text_turn("b"), vec![None]);
        h.push(text_turn("c"), vec![None]);
        assert!(!h.refine(ContextKey::new(12, 0), ContextKey::new(8, 0), 4, &level3));
        assert!(!h.refine(ContextKey::new(12, 0), base, 2, &level2));
        assert!(h.refined.is_empty());
        assert_eq!(h.bytes(), 2 * (64 + 1));
    }
}
