//! Decoding the chunks of one part, independently and in any order, and assembling the part.

use super::*;

/// A transformer model's run over a part: the tokens of the chunks decoded so far, and where the
/// model stands (`cursor`, at the start of chunk `at`; `None` before the first chunk, and after
/// a chunk failed).
#[derive(Debug)]
pub(super) struct Run {
    pub(super) cursor: Option<Cursor>,
    pub(super) at: u64,
    pub(super) done: Vec<Vec<u32>>,
}

/// Decodes the chunks of one part: independently and in any order, but for a transformer part,
/// whose chunks continue one run of the model: its chunk `i` decodes once chunks `0..i` have
/// ([`PartError::ChunkOrder`] before), cheapest in order (a chunk decoded again, or after
/// another chunk's failure, first runs the model over the chunks before it).
#[derive(Debug, Clone)]
pub struct PartDecoder {
    pub(super) shape: PartShape,
    /// The model state after the references; for a text part with an adaptive or static text
    /// model it is in `text` instead (and this is `State::Uniform`, unused).
    pub(super) state: State,
    /// A text model, decoded from in place (each chunk a trial that leaves it as it was), so a
    /// chunk costs its own tokens, not a copy of everything the session has learned. Clones of
    /// the decoder share it; the lock serialises their chunks.
    pub(super) text: Option<Arc<std::sync::Mutex<AdaptiveText>>>,
    /// A transformer part's run of the model, carried from chunk to chunk (clones share it).
    pub(super) run: Option<Arc<std::sync::Mutex<Run>>>,
    /// Tokens the part codes (the region's cells for a masked part).
    pub(super) tokens: u64,
    pub(super) chunk_tokens: u64,
    pub(super) chunks: u64,
    pub(super) text_space: u32,
}

impl PartDecoder {
    /// Number of chunks the part has.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Number of tokens the part codes: every token of the part, except for a masked part,
    /// which codes only the cells of its region.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The token range `[start, end)` chunk `index` covers.
    pub fn chunk_range(&self, index: u64) -> Result<(u64, u64), PartError> {
        if index >= self.chunks {
            return Err(PartError::NoSuchChunk {
                index,
                chunks: self.chunks,
            });
        }
        let start = index * self.chunk_tokens;
        Ok((start, (start + self.chunk_tokens).min(self.tokens)))
    }

    /// Decodes chunk `index` from its payload. A corrupt payload yields an error or wrong
    /// tokens for this chunk only. A masked part's one chunk decodes to the tokens of its
    /// region's cells in row-major order ([`assemble`](Self::assemble) adds the other cells).
    pub fn decode_chunk(&self, index: u64, payload: &[u8]) -> Result<Vec<u32>, PartError> {
        let (start, end) = self.chunk_range(index)?;
        let (start, end) = (start as usize, end as usize);
        let mut dec = Decoder::new(payload);
        let mut out = Vec::with_capacity((end - start).min(1 << 16));
        if let Some(text) = &self.text {
            let mut t = text.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(t.decode_trial(&mut dec, end - start)?);
        }
        match (self.state.clone(), self.shape) {
            (State::Uniform, PartShape::Grid { codebook_size, .. }) => {
                let u = Uniform::new(codebook_size);
                for _ in start..end {
                    out.push(dec.decode(&u)?);
                }
            }
            (State::Uniform, PartShape::Text { .. }) => {
                for _ in start..end {
                    out.push(Uniform::decode_wide(&mut dec, self.text_space)?);
                }
            }
            (State::Static(m), _) => {
                for _ in start..end {
                    out.push(dec.decode(m.distribution())?);
                }
            }
            (State::Grid(mut g), PartShape::Grid { width, .. }) => {
                g.decode(&mut dec, &mut out, width, start..end)?
            }
            (State::Text(mut t), _) => out = t.decode(&mut dec, end - start)?,
            (
                State::Generic(_) | State::Masked { .. } | State::TextCond { .. },
                PartShape::Grid { .. },
            ) => {
                out = self.decode_run(index, end - start, &mut dec)?;
            }
            (State::Generic(_) | State::Masked { .. } | State::TextCond { .. }, _) => {
                return Err(PartError::ModelUnavailable {
                    model: ModelChoice::Generic,
                    kind: SequenceKind::Text,
                })
            }
            (State::Grid(_), PartShape::Text { .. }) => {
                return Err(PartError::ModelUnavailable {
                    model: ModelChoice::Adaptive,
                    kind: SequenceKind::Text,
                })
            }
        }
        Ok(out)
    }

    /// Decodes chunk `index` of a transformer part: `n` more tokens of the model's run.
    fn decode_run(&self, index: u64, n: usize, dec: &mut Decoder) -> Result<Vec<u32>, PartError> {
        let Some(run) = &self.run else {
            return Err(PartError::Transformer("no model run for this part".into()));
        };
        let mut run = run.lock().unwrap_or_else(|p| p.into_inner());
        let decoded = run.done.len() as u64;
        if index > decoded {
            return Err(PartError::ChunkOrder {
                expected: decoded,
                got: index,
            });
        }
        let transformer = |e: crate::nn::model::ModelError| PartError::Transformer(e.to_string());
        if run.cursor.is_none() || run.at != index {
            // Back to the start of chunk `index`: the model runs again over the tokens of the
            // chunks before it, in one batched pass.
            run.cursor = None;
            let mut cursor = super::stream::start_run(&self.state, &self.shape)?
                .ok_or_else(|| PartError::Transformer("no model run for this part".into()))?;
            let before: Vec<u32> = run.done[..index as usize].concat();
            match &self.state {
                State::Generic(m) => m.advance_known(&mut cursor, &before),
                State::Masked { model: m, .. } => m.advance_known(&mut cursor, &before),
                State::TextCond { model: m, .. } => m.advance_known(&mut cursor, &before),
                _ => Ok(Vec::new()),
            }
            .map_err(transformer)?;
            run.cursor = Some(cursor);
            run.at = index;
        }
        run.done.truncate(index as usize);
        let mut out = Vec::with_capacity(n.min(1 << 16));
        let mut pick = |_: usize, w: &[u64]| {
            let id = dec.decode(&Dense::from_weights(w.iter().copied()))?;
            out.push(id);
            Ok(id)
        };
        let Some(cursor) = run.cursor.as_mut() else {
            return Err(PartError::Transformer("no model run for this part".into()));
        };
        let r = match &self.state {
            State::Generic(m) => m.advance(cursor, n, &mut pick),
            State::Masked { model: m, .. } => m.advance(cursor, n, &mut pick),
            State::TextCond { model: m, .. } => m.advance(cursor, n, &mut pick),
            _ => Ok(()),
        };
        if let Err(e) = r {
            // The model is part way into the chunk: start again next time.
            run.cursor = None;
            return Err(transformer(e));
        }
        run.at = index + 1;
        run.done.push(out.clone());
        Ok(out)
    }

    /// Decodes every chunk (in order) and assembles the part.
    pub fn decode_all<'a>(
        &self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<DecodedPart, PartError> {
        let mut ids = Vec::new();
        let mut got = 0;
        for (i, p) in payloads.into_iter().enumerate() {
            ids.extend(self.decode_chunk(i as u64, p)?);
            got += 1;
        }
        if got != self.chunks {
            return Err(PartError::NoSuchChunk {
                index: got,
                chunks: self.chunks,
            });
        }
        self.assemble(ids)
    }

    /// Builds the part from all its decoded tokens in order (the concatenation of its chunks'
    /// tokens). For a masked part, `ids` are the region's cells (row-major) and every other cell
    /// is taken from the reference image: the result is the full grid.
    pub fn assemble(&self, ids: Vec<u32>) -> Result<DecodedPart, PartError> {
        if ids.len() as u64 != self.tokens {
            return Err(PartError::TokenCount {
                got: ids.len() as u64,
                expected: self.tokens,
            });
        }
        let ids = match &self.state {
            State::Masked { known, unknown, .. } => {
                let mut coded = ids.into_iter();
                known
                    .iter()
                    .zip(unknown)
                    .map(|(&k, &u)| if u { coded.next().unwrap_or(k) } else { k })
                    .collect()
            }
            _ => ids,
        };
        Ok(match self.shape {
            PartShape::Text { .. } => DecodedPart::Text(ids),
            PartShape::Grid {
                height,
                width,
                codebook_size,
            } => DecodedPart::Grid(TokenGrid::new(height, width, codebook_size, ids)?),
        })
    }
}

/// A decoded part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodedPart {
    /// Text ids.
    Text(Vec<u32>),
    /// A grid.
    Grid(TokenGrid),
}
