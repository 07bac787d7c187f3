//! The part layer of a message stream: a part header checked against the session (tables,
//! modes, shape, limits, model work, context and digest) before any decoding, its chunks decoded
//! as they arrive, and the whole part assembled and committed to the context.

use super::*;
use crate::models::{EntropyEntry, TokenizerInfo};
use unimic_protocol::handshake::Negotiated;

pub(super) fn part_fail(e: &PartError) -> Fail {
    let code = match e {
        PartError::Context(ContextError::Missing(_)) => ErrorCode::CONTEXT_UNKNOWN,
        PartError::Context(ContextError::DigestMismatch { .. }) => ErrorCode::CONTEXT_MISMATCH,
        PartError::Context(_) => ErrorCode::CONTEXT_UNKNOWN,
        PartError::ModelMismatch { .. } | PartError::ModelUnavailable { .. } => {
            ErrorCode::MODEL_MISSING
        }
        PartError::TooLarge { .. } => ErrorCode::LIMIT_EXCEEDED,
        // The part breaks PROTOCOL.md §6.3-6.6 for its model: a transformer part's chunks out
        // of order, a region on another model, no image (masked) or text (text-conditioned)
        // reference, a reference image of another shape, a refinement that is not the level
        // above the image it references.
        PartError::ChunkOrder { .. }
        | PartError::LevelNotAllowed { .. }
        | PartError::Level { .. }
        | PartError::LadderBase { .. }
        | PartError::RegionNotAllowed { .. }
        | PartError::RegionRequired
        | PartError::RegionSize { .. }
        | PartError::MissingReference { .. }
        | PartError::ReferenceShape { .. } => ErrorCode::PROTOCOL_VIOLATION,
        _ => ErrorCode::DECODE_FAILED,
    };
    Fail::new(code, e.to_string())
}

/// What a coded part's header says, checked against the session's tables and limits alone
/// (PROTOCOL.md §6.2–6.4): no context, no budgets. A pure function of its inputs, so that it can
/// be fuzzed on its own ([`crate::fuzzing`]).
#[derive(Debug)]
pub(crate) struct CheckedHeader<'a> {
    pub entry: &'a EntropyEntry,
    pub tokenizer: String,
    pub part_kind: PartKind,
    /// Rows, columns and codebook size of an image part.
    pub grid: Option<(u32, u32, u32)>,
    /// Pixels the part covers (image parts).
    pub pixels: Option<u64>,
    /// The cells of a masked part.
    pub region: Option<Vec<bool>>,
    /// The level of a refinement part (mode 5).
    pub level: Option<u32>,
    /// Positions a transformer model runs to decode the part (0 for the other models).
    pub positions: u64,
}

/// Checks the header of a coded part of `kind` (see [`CheckedHeader`]).
pub(crate) fn check_header<'a>(
    negotiated: &Negotiated,
    tokenizers: &[TokenizerInfo],
    entropy: &'a [EntropyEntry],
    kind: SequenceKind,
    c: &CodedPart,
) -> Result<CheckedHeader<'a>, Fail> {
    let limits = negotiated.limits;
    let mut positions = 0u64;
    let tok_info = negotiated.tokenizer(c.tokenizer).ok_or_else(|| {
        Fail::new(
            ErrorCode::MODEL_MISSING,
            "tokenizer index outside the negotiated table",
        )
    })?;
    let local_tok = tokenizers
        .iter()
        .find(|t| t.info == *tok_info)
        .ok_or_else(|| {
            Fail::new(
                ErrorCode::MODEL_MISSING,
                format!("tokenizer {} is not held", tok_info.id),
            )
        })?;
    let entry =
        entropy_at(&negotiated.entropy_models, entropy, c.entropy_model).ok_or_else(|| {
            Fail::new(
                ErrorCode::MODEL_MISSING,
                format!(
                    "entropy model index {} is outside the negotiated table",
                    c.entropy_model.into_inner()
                ),
            )
        })?;
    if entry.kind.is_some_and(|k| k != kind) {
        return Err(Fail::new(
            ErrorCode::MODEL_MISSING,
            format!(
                "entropy model {} does not code this kind of part",
                entry.info.id
            ),
        ));
    }
    // Mode 2 is the masked model's, mode 5 the ladder's, and the text-conditioned model is
    // mode 3 (§6.3).
    let masked = matches!(c.mode, CodingMode::Masked(_));
    let level = match &c.mode {
        CodingMode::Refinement { level } => u32::try_from(level.into_inner()).ok(),
        _ => None,
    };
    if masked != (entry.choice == ModelChoice::Masked)
        || level.is_some() != (entry.choice == ModelChoice::Ladder)
        || (entry.choice == ModelChoice::TextCond && c.mode != CodingMode::TextConditioned)
    {
        return Err(Fail::new(
            ErrorCode::UNSUPPORTED,
            format!(
                "coding mode {} with entropy model {}",
                c.mode.wire_value(),
                entry.info.id
            ),
        ));
    }
    let rows = c.shape.rows.into_inner();
    let cols = c.shape.cols.into_inner();
    let mut region = None;
    let (part_kind, grid, pixels) = match (kind, local_tok.kind) {
        (SequenceKind::Text, TokenizerKind::Text { .. }) => {
            if rows != 1 || c.token_count != c.shape.cols {
                return Err(Fail::new(
                    ErrorCode::PROTOCOL_VIOLATION,
                    "text part shape is not 1 x token count",
                ));
            }
            let max_text = limits.max_context_bytes.into_inner() / 4;
            if cols > max_text {
                return Err(Fail::new(
                    ErrorCode::LIMIT_EXCEEDED,
                    format!("text part of {cols} tokens is above the limit of {max_text}"),
                ));
            }
            let tokens = (cols > 0).then_some(cols);
            (PartKind::Text { tokens }, None, None)
        }
        (
            SequenceKind::Grid,
            TokenizerKind::Image {
                codebook_size,
                patch,
            },
        ) => {
            for (what, value, limit) in [
                ("grid height", rows, limits.max_grid_height.into_inner()),
                ("grid width", cols, limits.max_grid_width.into_inner()),
            ] {
                if value > limit {
                    return Err(Fail::new(
                        ErrorCode::LIMIT_EXCEEDED,
                        format!("{what} {value} is above the limit of {limit}"),
                    ));
                }
            }
            let (h, w) = match (u32::try_from(rows), u32::try_from(cols)) {
                (Ok(h), Ok(w)) if h > 0 && w > 0 => (h, w),
                _ => {
                    return Err(Fail::new(ErrorCode::PROTOCOL_VIOLATION, "empty grid shape"));
                }
            };
            let coded = match &c.mode {
                CodingMode::Masked(r) => {
                    let mask = crate::region::from_wire(r, h, w)
                        .map_err(|e| Fail::new(ErrorCode::PROTOCOL_VIOLATION, e))?;
                    let cells = mask.iter().filter(|&&m| m).count() as u64;
                    region = Some(mask);
                    cells
                }
                _ => rows.saturating_mul(cols),
            };
            if c.token_count.into_inner() != coded {
                return Err(Fail::new(
                    ErrorCode::PROTOCOL_VIOLATION,
                    "grid token count is not rows x cols (masked: the cells of the region)",
                ));
            }
            // A few payload bytes may ask a transformer for a full pass per position: bound
            // the model work one message may cost, charged by the positions the model runs
            // (not the cells coded: a 1-cell edit of a large grid runs most of the grid),
            // before any decoding.
            if entry.choice.is_transformer() {
                positions = match (&region, entry.choice) {
                    (Some(mask), _) => {
                        let (prefix, len) = unimic_codec::entropy::masked::layout(mask);
                        (prefix.len() + len) as u64
                    }
                    (None, ModelChoice::TextCond) => rows
                        .saturating_mul(cols)
                        .saturating_add(TEXT_PROMPT_POSITIONS),
                    (None, _) => rows.saturating_mul(cols),
                };
            }
            let px = u64::from(patch) * u64::from(patch);
            (
                PartKind::Image {
                    height: h,
                    width: w,
                    codebook_size,
                },
                Some((h, w, codebook_size)),
                Some(coded * px),
            )
        }
        _ => {
            return Err(Fail::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "tokenizer kind does not match the part kind",
            ))
        }
    };
    Ok(CheckedHeader {
        entry,
        tokenizer: tok_info.id.clone(),
        part_kind,
        grid,
        pixels,
        region,
        level,
        positions,
    })
}

impl Task {
    /// Checks a part header; returns the part's state and what the caller is told of it.
    pub(super) async fn start_part(&mut self, h: PartHeader) -> Result<(Current, PartInfo), Fail> {
        let shared = self.shared.clone();
        let index = h.index.into_inner();
        let coded = match h.body {
            PartBody::Raw(r) => {
                let info = PartInfo {
                    index,
                    kind: PartKind::Raw {
                        media_type: r.media_type.clone(),
                    },
                    context: Vec::new(),
                    tokenizer: String::new(),
                    region: None,
                    level: 1,
                };
                let current = Current::Raw {
                    index,
                    media_type: r.media_type,
                    bytes: RawBytes::default(),
                    stats: PartStats {
                        index,
                        ..PartStats::default()
                    },
                };
                return Ok((current, info));
            }
            PartBody::Text(c) => (SequenceKind::Text, c),
            PartBody::Image(c) => (SequenceKind::Grid, c),
            _ => return Err(Fail::new(ErrorCode::UNSUPPORTED, "unknown part kind")),
        };
        let (kind, c): (SequenceKind, CodedPart) = coded;
        let CheckedHeader {
            entry,
            tokenizer,
            part_kind,
            grid,
            pixels,
            region,
            level,
            positions,
        } = check_header(
            &shared.negotiated,
            &shared.tokenizers,
            &shared.entropy,
            kind,
            &c,
        )?;
        // A few payload bytes may ask a transformer for a full pass per position: bound the
        // model work one message may cost, charged by the positions the model runs (not the
        // cells coded: a 1-cell edit of a large grid runs most of the grid), before any decoding.
        if positions > 0 {
            let budget = shared.config.max_message_model_tokens;
            self.model_tokens = self.model_tokens.saturating_add(positions);
            if self.model_tokens > budget {
                return Err(Fail::new(
                    ErrorCode::LIMIT_EXCEEDED,
                    format!(
                        "{} transformer positions in one message, above the limit of {budget}",
                        self.model_tokens
                    ),
                ));
            }
            // And by the model work per second this session and the server allow.
            if let Err(whose) = shared.take_model_work(positions) {
                return Err(Fail::new(
                    ErrorCode::BUSY,
                    format!(
                        "{whose} budget of transformer work per second is spent \
                         ({positions} positions asked); retry later"
                    ),
                ));
            }
        }
        let keys: Vec<ContextKey> = c
            .context
            .iter()
            .map(|r| ContextKey::new(r.message_id.into_inner(), r.part_index.into_inner()))
            .collect();
        if !keys.is_empty() {
            // Boxed: a rare wait (with its timer) would otherwise enlarge every event's future.
            Box::pin(self.wait_context(&keys)).await?;
        }
        {
            let st = shared.state();
            st.context
                .verify(&keys, &c.context_digest)
                .map_err(|e| part_fail(&PartError::from(e)))?;
        }
        let mut spec = PartSpec::new(entry.choice).with_refs(keys.clone());
        if let Some(r) = &region {
            spec = spec.with_region(r.clone());
        }
        if let Some(l) = level {
            spec = spec.with_level(l);
        }
        let info = PartInfo {
            index,
            kind: part_kind,
            context: keys,
            tokenizer,
            region,
            level: level.unwrap_or(1),
        };
        let current = Current::Coded {
            index,
            spec,
            digest: c.context_digest,
            identity: entry.identity,
            kind,
            grid,
            decoder: None,
            ids: Vec::new(),
            stats: PartStats {
                index,
                pixels,
                ..PartStats::default()
            },
        };
        Ok((current, info))
    }

    /// Waits until every referenced entry is in the context, as long as one may still arrive
    /// (a peer message in flight, or a stream whose header is not read yet).
    pub(super) async fn wait_context(&mut self, keys: &[ContextKey]) -> Result<(), Fail> {
        let shared = self.shared.clone();
        let deadline = tokio::time::Instant::now() + shared.config.context_wait;
        let watch = shared.watch();
        loop {
            let notified = watch.changed();
            let missing = {
                let st = shared.state();
                let missing = keys.iter().find(|k| st.context.get(**k).is_none()).copied();
                match missing {
                    None => return Ok(()),
                    Some(k) => {
                        // An earlier part of this very message is complete: if it is not held
                        // (a raw part, or one too large to keep) it never will be.
                        let may_arrive = if Some(k.message_id) == self.message_id {
                            false
                        } else if shared.is_peer_id(k.message_id) {
                            st.peer_inflight.contains(&k.message_id) || st.pending_headers > 0
                        } else {
                            st.own_inflight.contains(&k.message_id)
                        };
                        if !may_arrive {
                            return Err(part_fail(&PartError::Context(ContextError::Missing(k))));
                        }
                        k
                    }
                }
            };
            // About to wait: what the caller may already have goes out first.
            self.flush_events().await;
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(part_fail(&PartError::Context(ContextError::Missing(
                    missing,
                ))));
            }
        }
    }

    /// `wire`: the size of the chunk's frame.
    pub(super) async fn on_chunk(&mut self, c: PartChunk, wire: u64) -> Result<(), Fail> {
        // A long decode is a wait: what the caller may already have goes out first. So is every
        // chunk of a transformer part (decoded on the blocking pool): when its chunks come as
        // fast as they decode, the reads never wait, and the caller would otherwise see the
        // rows of a streamed image only at its end.
        let transformer = matches!(
            &self.current,
            Some(Current::Coded { spec, .. }) if spec.model.is_transformer()
        );
        if c.token_count.into_inner() > BLOCKING_TOKENS || transformer {
            Box::pin(self.flush_events()).await;
        }
        let seq = c.seq.into_inner();
        let fin = c.fin;
        let index = c.part_index.into_inner();
        let Some(current) = self.current.as_mut() else {
            return Err(Fail::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "chunk outside a part",
            ));
        };
        let data = match current {
            Current::Raw { bytes, stats, .. } => {
                stats.payload_bytes += c.payload.len() as u64;
                stats.wire_bytes += wire;
                let limit = self.shared.negotiated.limits.max_message_bytes.into_inner();
                if bytes.len() as u64 + c.payload.len() as u64 > limit {
                    return Err(Fail::new(ErrorCode::LIMIT_EXCEEDED, "attachment too large"));
                }
                bytes.push(&c.payload);
                ChunkData::Raw(c.payload.clone())
            }
            Current::Coded {
                spec,
                digest,
                identity,
                kind,
                grid,
                decoder,
                ids,
                stats,
                ..
            } => {
                stats.payload_bytes += c.payload.len() as u64;
                stats.wire_bytes += wire;
                let n = c.token_count.into_inner();
                let start = ids.len() as u64;
                // Highly predictable tokens cost almost no bits, so token counts are bounded
                // separately from bytes: per chunk, and per part by the codec's limit.
                let max_part = self.shared.config.codec.max_part_tokens;
                if n > max_chunk_tokens(&self.shared.negotiated.limits)
                    || start.saturating_add(n) > max_part
                {
                    return Err(Fail::new(
                        ErrorCode::LIMIT_EXCEEDED,
                        format!("{n} tokens in one chunk (part limit {max_part})"),
                    ));
                }
                let decoded = match (*kind, *grid) {
                    (SequenceKind::Grid, Some((height, width, codebook_size))) => {
                        if decoder.is_none() {
                            let chunk_tokens = u32::try_from(n).unwrap_or(u32::MAX).max(1);
                            let spec = spec.clone().with_chunk_tokens(chunk_tokens);
                            let shape = PartShape::Grid {
                                height,
                                width,
                                codebook_size,
                            };
                            let big = shape.tokens() > BLOCKING_TOKENS || !spec.refs.is_empty();
                            let (digest, identity) = (*digest, *identity);
                            let shared = self.shared.clone();
                            let make = move || {
                                let mut st = shared.state();
                                let st = &mut *st;
                                st.codec
                                    .decoder(&st.context, shape, &spec, &digest, &identity)
                            };
                            let d = if big {
                                tokio::task::spawn_blocking(make)
                                    .await
                                    .map_err(|e| Fail::new(ErrorCode::INTERNAL, e.to_string()))?
                            } else {
                                make()
                            }
                            .map_err(|e| part_fail(&e))?;
                            *decoder = Some(Arc::new(d));
                        }
                        let Some(d) = decoder.as_ref() else {
                            return Err(Fail::new(ErrorCode::INTERNAL, "no decoder"));
                        };
                        let (lo, hi) = d.chunk_range(seq).map_err(|_| {
                            Fail::new(
                                ErrorCode::PROTOCOL_VIOLATION,
                                "more chunks than the part has",
                            )
                        })?;
                        if hi - lo != n || lo != start {
                            return Err(Fail::new(
                                ErrorCode::PROTOCOL_VIOLATION,
                                "chunk token count does not match the chunking",
                            ));
                        }
                        if n > BLOCKING_TOKENS || spec.model.is_transformer() {
                            let (d, payload) = (d.clone(), c.payload.clone());
                            tokio::task::spawn_blocking(move || d.decode_chunk(seq, &payload))
                                .await
                                .map_err(|e| Fail::new(ErrorCode::INTERNAL, e.to_string()))?
                        } else {
                            d.decode_chunk(seq, &c.payload)
                        }
                        .map_err(|e| part_fail(&e))?
                    }
                    _ => {
                        // Text chunks are coded independently from the state after the
                        // references, so each decodes alone whatever the chunking.
                        let (spec, digest, identity) = (spec.clone(), *digest, *identity);
                        let (shared, payload) = (self.shared.clone(), c.payload.clone());
                        let decode = move || {
                            let mut guard = shared.state();
                            let st = &mut *guard;
                            st.codec.decode_text_chunk(
                                &st.context,
                                &spec,
                                &digest,
                                &identity,
                                n,
                                &payload,
                            )
                        };
                        if n > BLOCKING_TOKENS {
                            tokio::task::spawn_blocking(decode)
                                .await
                                .map_err(|e| Fail::new(ErrorCode::INTERNAL, e.to_string()))?
                        } else {
                            decode()
                        }
                        .map_err(|e| part_fail(&e))?
                    }
                };
                if decoded.len() as u64 != n {
                    return Err(Fail::new(
                        ErrorCode::DECODE_FAILED,
                        "chunk decoded to the wrong length",
                    ));
                }
                stats.tokens += n;
                ids.extend_from_slice(&decoded);
                ChunkData::Tokens {
                    start,
                    ids: decoded,
                }
            }
        };
        self.last_chunk = (index, seq);
        self.emit(Ok(MessageEvent::Chunk {
            part_index: index,
            seq,
            fin,
            data,
        }));
        if fin {
            self.end_part().await?;
        }
        Ok(())
    }

    pub(super) async fn end_part(&mut self) -> Result<(), Fail> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let message_id = self.message_id.unwrap_or(0);
        let (index, part, stats, seq) = match current {
            Current::Raw {
                index,
                media_type,
                bytes,
                stats,
            } => (
                index,
                ReceivedPart::Raw {
                    media_type,
                    bytes: bytes.into_bytes(),
                },
                stats,
                None,
            ),
            Current::Coded {
                index,
                grid,
                decoder,
                ids,
                stats,
                spec,
                ..
            } => match grid {
                Some((h, w, k)) => {
                    // The decoder assembles the whole grid (for a masked part: the reference
                    // outside the region).
                    let g = match decoder {
                        Some(d) => match d.assemble(ids) {
                            Ok(DecodedPart::Grid(g)) => Ok(g),
                            Ok(DecodedPart::Text(_)) => {
                                Err("a grid part decoded to text".to_string())
                            }
                            Err(e) => Err(e.to_string()),
                        },
                        None => TokenGrid::new(h, w, k, ids).map_err(|e| e.to_string()),
                    }
                    .map_err(|e| Fail::new(ErrorCode::DECODE_FAILED, e))?;
                    match spec.level {
                        // A refinement level: its base is the first image it references.
                        Some(level) => {
                            let base = {
                                let st = self.shared.state();
                                spec.refs.iter().copied().find(|k| {
                                    st.context
                                        .get(*k)
                                        .is_some_and(|s| s.kind() == SequenceKind::Grid)
                                })
                            }
                            .ok_or_else(|| {
                                Fail::new(
                                    ErrorCode::PROTOCOL_VIOLATION,
                                    "a refinement without a base image in the context",
                                )
                            })?;
                            let seq = Sequence::refinement(&g, level);
                            let part = ReceivedPart::Refinement {
                                level,
                                base,
                                grid: g,
                            };
                            (index, part, stats, Some(seq))
                        }
                        None => {
                            let seq = Sequence::grid(&g);
                            (index, ReceivedPart::Image(g), stats, Some(seq))
                        }
                    }
                }
                None => {
                    let seq = Sequence::text(ids.clone());
                    (index, ReceivedPart::Text(ids), stats, Some(seq))
                }
            },
        };
        if let Some(seq) = seq {
            let key = ContextKey::new(message_id, index);
            let evicted = {
                let mut st = self.shared.state();
                st.context.insert(key, seq)
            };
            if evicted.is_ok() {
                self.kept.push(key);
            }
            self.shared.notify_changed();
            match evicted {
                // Boxed: evictions are rare, and the write would enlarge every chunk's future.
                Ok(ev) if !ev.is_empty() => Box::pin(self.shared.announce_evicted(ev)).await,
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "part not kept in context"),
            }
        }
        self.stats.add_part(stats.clone());
        self.emit(Ok(MessageEvent::PartEnd { index, part, stats }));
        Ok(())
    }
}
