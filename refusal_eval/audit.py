"""The audit pipeline: pairs -> tokenised batch -> behaviour -> metric -> patching -> statistics -> report."""

from __future__ import annotations

import logging
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from refusal_eval import __version__
from refusal_eval.config import AuditConfig
from refusal_eval.data.pairs import file_sha256, load_pairs, shipped_dataset
from refusal_eval.errors import DataError, MetricError
from refusal_eval.metrics import derive_token_sets, is_refusal, refusal_score
from refusal_eval.models.loading import LoadedModel, load_model
from refusal_eval.patching.attribution import attribute
from refusal_eval.patching.components import components_at
from refusal_eval.patching.exact import PatchEngine, build_pair_batch
from refusal_eval.report import schema as rs
from refusal_eval.stats import mean_interval, share_intervals, wilson_interval

log = logging.getLogger("refusal_eval")


def format_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn through the model's chat template, ready for the first reply token."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of trailing tokens the two sequences share (the chat-template suffix and more)."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.inference_mode()
def greedy_replies(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 64,
    desc: str = "generating", progress: bool = True,
) -> tuple[list[int], list[str]]:
    """Greedy completions: (first generated token id, decoded reply) for each tokenised prompt."""
    tok = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    firsts: list[int] = []
    replies: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        ids, mask = _left_pad(prompts[start : start + batch_size], tok.pad_token_id)
        out = loaded.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id,
        )
        new = out[:, ids.shape[1] :].cpu()
        firsts.extend(int(t) for t in new[:, 0])
        replies.extend(tok.batch_decode(new, skip_special_tokens=True))
    return firsts, replies


def _rate(successes: int, total: int, level: float) -> rs.Rate:
    low, high = wilson_interval(successes, total, level)
    return rs.Rate(
        successes=successes, total=total, rate=successes / total if total else None,
        ci_low=None if np.isnan(low) else low, ci_high=None if np.isnan(high) else high,
    )


def _environment() -> rs.Environment:
    return rs.Environment(
        python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
        transformers=transformers.__version__, refusal_eval=__version__, threads=torch.get_num_threads(),
    )


def _verify(engine, batch, components, config, estimated, approximate, target_scores):
    """Exact patching of the top-k cells by |estimated effect| and of a random sample of the rest."""
    from scipy.stats import spearmanr

    # Rank cells by how far their estimated patch moves the score, summed over pairs.
    order = np.argsort(-np.abs(estimated - target_scores[None, :]).sum(axis=1))
    top = [int(k) for k in order[: config.verify_top]]
    rest = [int(k) for k in order[config.verify_top :]]
    rng = np.random.default_rng(config.seed)
    sample = [int(k) for k in rng.choice(rest, size=min(config.verify_random, len(rest)), replace=False)]
    chosen = top + sample
    exact = engine.patch(batch, [components[k] for k in chosen], config.direction).numpy().astype(np.float64)
    est = estimated[chosen]
    corrected = estimated.copy()
    corrected[chosen] = exact
    approximate[chosen] = False
    moves_exact, moves_est = exact.sum(axis=1), est.sum(axis=1)
    rho = float(spearmanr(moves_exact, moves_est).statistic) if len(chosen) > 2 else None
    info = rs.AttributionInfo(
        n_verified=len(chosen), n_top=len(top), n_random=len(sample),
        spearman=None if rho is None or not np.isfinite(rho) else rho,
        max_abs_error=float(np.abs(exact - est).max()),
        verified_ids=[components[k].id for k in chosen],
    )
    return corrected, info


def _engine_info(engine: PatchEngine, loaded: LoadedModel, batch) -> rs.EngineInfo:
    """What the patching engine did and the run's peak memory (CUDA: allocator peak; CPU: process peak RSS)."""
    one_forward = batch.n_pairs * batch.width * loaded.n_layers
    if engine.device.type == "cuda":
        peak, kind = int(torch.cuda.max_memory_allocated(engine.device)), "CUDA allocator peak"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        kind = "peak resident memory of the whole process"
    return rs.EngineInfo(
        batch_rows=engine.work["batch_rows"] or engine.rows(batch.width), layer_skip=bool(engine._layer_skip),
        prefix_reuse=engine.work["prefix_batches"] > 0, patched_forwards=engine.work["patched_forwards"],
        forward_equivalents=round(engine.work["token_layers"] / one_forward, 2),
        weights_bytes=sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
        peak_memory_bytes=peak, peak_memory_kind=kind,
    )


def audit(config: AuditConfig | None = None, command: str = "", progress: bool = True) -> rs.AuditReport:
    """Run a complete refusal audit and return the validated report (nothing is written)."""
    config = config or AuditConfig()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    warnings: list[str] = []

    dataset_path = Path(config.dataset) if config.dataset else shipped_dataset()
    pairs = load_pairs(dataset_path, split=config.split)
    if config.max_pairs:
        pairs = pairs[: config.max_pairs]
    tricky_path: Path | None
    if config.tricky is None:
        tricky_path = shipped_dataset("tricky_benign.jsonl") if config.dataset is None else None
    else:
        tricky_path = Path(config.tricky) if config.tricky else None
    tricky = load_pairs(tricky_path) if tricky_path else []

    log.info("loading model %s", config.model or "tiny-refuser")
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    tok = loaded.tokenizer

    # -- behaviour: greedy replies on both sides ----------------------------------------------------------
    harmful_ids = [format_prompt(tok, p.harmful) for p in pairs]
    benign_ids = [format_prompt(tok, p.benign) for p in pairs]
    first_h, reply_h = greedy_replies(loaded, harmful_ids, config.max_new_tokens, desc="replies (harmful)",
                                      progress=progress)
    first_b, reply_b = greedy_replies(loaded, benign_ids, config.max_new_tokens, desc="replies (benign)",
                                      progress=progress)
    refused_h = [is_refusal(r) for r in reply_h]
    refused_b = [is_refusal(r) for r in reply_b]
    level = config.ci_level
    behaviour = rs.Behaviour(
        harmful_refusal=_rate(sum(refused_h), len(pairs), level),
        benign_compliance=_rate(len(pairs) - sum(refused_b), len(pairs), level),
        benign_over_refusal=_rate(sum(refused_b), len(pairs), level),
    )
    if tricky:
        _, tr_h = greedy_replies(loaded, [format_prompt(tok, p.harmful) for p in tricky], config.max_new_tokens,
                                 desc="replies (tricky harmful)", progress=progress)
        _, tr_b = greedy_replies(loaded, [format_prompt(tok, p.benign) for p in tricky], config.max_new_tokens,
                                 desc="replies (tricky benign)", progress=progress)
        behaviour.tricky_harmful_refusal = _rate(sum(map(is_refusal, tr_h)), len(tricky), level)
        behaviour.tricky_benign_over_refusal = _rate(sum(map(is_refusal, tr_b)), len(tricky), level)
    if sum(refused_h) < 0.5 * len(pairs):
        warnings.append(
            f"the model refuses only {sum(refused_h)}/{len(pairs)} harmful prompts: it is a weak refuser, and "
            "shares describe what moves the refusal score, not a refusal behaviour it shows"
        )

    # -- metric -------------------------------------------------------------------------------------------
    token_sets = derive_token_sets(first_h + first_b, refused_h + refused_b, tok)
    if "fall back" in token_sets.derivation:
        warnings.append("refusal score token sets use canonical fallbacks: " + token_sets.derivation)
    ref_ids, com_ids = torch.tensor(token_sets.refusal), torch.tensor(token_sets.compliance)

    def score_fn(logits: torch.Tensor) -> torch.Tensor:
        return refusal_score(logits, ref_ids.to(logits.device), com_ids.to(logits.device), config.metric)

    engine = PatchEngine(loaded, score_fn, max_rows=config.batch_rows, progress=progress)

    # -- baseline scores for every pair; exclusions ---------------------------------------------------------
    def side_scores(seqs: list[list[int]]) -> list[float]:
        values: list[float] = []
        size = engine.rows(max(map(len, seqs), default=1))
        for start in range(0, len(seqs), size):
            ids, mask = _left_pad(seqs[start : start + size], tok.pad_token_id)
            values.extend(engine.scores(ids, mask).tolist())
        return values

    m_h, m_b = side_scores(harmful_ids), side_scores(benign_ids)
    for value, pair in zip(m_h + m_b, pairs + pairs, strict=True):
        if not np.isfinite(value):
            raise MetricError(f"pair {pair.id}: refusal score is not finite ({value}); check the model's dtype")
    # Patching every position (or all at once) needs both sides to have the same length; the suffix and
    # last-token modes right-align pairs instead, so unequal pairs stay in.
    full_alignment = bool({"all", "each"} & set(config.positions))
    exclusions: list[rs.Exclusion] = []
    used: list[int] = []
    for i, pair in enumerate(pairs):
        if full_alignment and len(harmful_ids[i]) != len(benign_ids[i]):
            exclusions.append(rs.Exclusion(
                pair_id=pair.id, reason="unequal_token_length",
                detail=f"harmful side {len(harmful_ids[i])} tokens, benign side {len(benign_ids[i])} tokens; "
                "use --positions suffix,last to keep such pairs (right-aligned)",
            ))
        elif m_h[i] <= m_b[i] and not config.keep_all_pairs:
            exclusions.append(rs.Exclusion(
                pair_id=pair.id, reason="baseline_wrong_sign",
                detail=f"m(harmful)={m_h[i]:.3f} <= m(benign)={m_b[i]:.3f}",
            ))
        else:
            used.append(i)
    counts = dict(Counter(e.reason for e in exclusions))
    if counts:
        warnings.append(
            "excluded from patching: " + ", ".join(f"{n} pair(s) {reason}" for reason, n in sorted(counts.items()))
        )
    if len(used) < 2:
        raise DataError(
            f"only {len(used)} usable pair(s) after exclusions {counts}; patching needs at least 2. "
            "Use more pairs, pairs of equal token length, or --keep-all-pairs."
        )

    # -- gap ------------------------------------------------------------------------------------------------
    gaps = np.array([m_h[i] - m_b[i] for i in used])
    gap_ci = mean_interval(gaps, level, config.n_boot, config.ci_method, config.seed)
    separated = bool(gap_ci.low > 0)
    gap = rs.Gap(mean=float(gap_ci.estimate), ci_low=float(gap_ci.low), ci_high=float(gap_ci.high),
                 total=float(gaps.sum()), separated=separated)
    if not separated:
        warnings.append(
            f"UNDEFINED SHARES: the model does not separate harmful from benign (gap {gap.mean:.3f}, "
            f"{level:.0%} CI [{gap.ci_low:.3f}, {gap.ci_high:.3f}] includes 0); shares would be noise and are "
            "not reported"
        )

    # -- patching -------------------------------------------------------------------------------------------
    batch = build_pair_batch([(harmful_ids[i], benign_ids[i]) for i in used], tok.pad_token_id,
                             [pairs[i].id for i in used], allow_unequal=not full_alignment)
    suffix = min(common_suffix(harmful_ids[i], benign_ids[i]) for i in used)
    wanted: set[int | None] = set()
    if "all" in config.positions:
        wanted.add(None)
    if "each" in config.positions:
        wanted.update(range(-batch.width, 0))
    if "suffix" in config.positions:
        wanted.update(range(-suffix, 0))
    if "last" in config.positions:
        wanted.add(-1)
    positions_wanted = sorted(wanted, key=lambda p: (p is not None, p or 0))
    components = components_at(config.components, loaded.n_layers, loaded.n_heads, positions_wanted)
    log.info("patching %d components x %d pairs", len(components), len(used))
    attribution_info = None
    approximate = np.zeros(len(components), dtype=bool)
    if config.method == "exact":
        patched = engine.patch(batch, components, config.direction).numpy().astype(np.float64)
    else:
        patched = attribute(engine, batch, components, config.direction).numpy().astype(np.float64)
        approximate[:] = True
        if config.method == "attribution+verify":
            target = np.array([m_b[i] if config.direction == "denoise" else m_h[i] for i in used])
            patched, attribution_info = _verify(engine, batch, components, config, patched, approximate, target)
    base_h, base_b = np.array([m_h[i] for i in used]), np.array([m_b[i] for i in used])
    effects = patched - base_b if config.direction == "denoise" else base_h - patched
    bad = ~np.isfinite(effects)
    if bad.any():
        c, p = np.argwhere(bad)[0]
        raise MetricError(f"non-finite patched score for pair {batch.pair_ids[p]}, component {components[c].id}")
    intervals = None
    if separated:
        intervals = share_intervals(effects, gaps, level, config.n_boot, config.ci_method, config.seed)

    results = [
        rs.ComponentResult(
            id=c.id, hook_name=c.hook_name, kind=c.kind, layer=c.layer, head=c.head, position=c.position,
            share=float(intervals.estimate[k]) if intervals else None,
            ci_low=float(intervals.low[k]) if intervals else None,
            ci_high=float(intervals.high[k]) if intervals else None,
            fw_low=float(intervals.fw_low[k]) if intervals else None,
            fw_high=float(intervals.fw_high[k]) if intervals else None,
            significant=bool(intervals.fw_low[k] > 0 or intervals.fw_high[k] < 0) if intervals else None,
            effects=[round(float(v), 6) for v in effects[k]],
            approximate=bool(approximate[k]),
        )
        for k, c in enumerate(components)
    ]

    # -- positions: what text each offset holds ------------------------------------------------------------
    positions = []
    for offset in range(-batch.width, 0):
        col = batch.width + offset
        real = batch.harmful_mask[:, col].bool() & batch.benign_mask[:, col].bool()
        if not real.any():
            continue
        h_tokens = batch.harmful_ids[real, col].tolist()
        b_tokens = batch.benign_ids[real, col].tolist()
        positions.append(rs.PositionInfo(
            position=offset, n_pairs=int(real.sum()),
            n_differ=sum(a != b for a, b in zip(h_tokens, b_tokens, strict=True)),
            harmful_text=tok.decode([Counter(h_tokens).most_common(1)[0][0]]),
            benign_text=tok.decode([Counter(b_tokens).most_common(1)[0][0]]),
        ))

    used_set = set(used)
    pair_results = []
    for i, pair in enumerate(pairs):
        h, b = harmful_ids[i], benign_ids[i]
        diff = next((k for k in range(min(len(h), len(b))) if h[k] != b[k]), None)
        pair_results.append(rs.PairResult(
            id=pair.id, category=pair.category, n_tokens_harmful=len(h), n_tokens_benign=len(b),
            m_harmful=m_h[i], m_benign=m_b[i], harmful_reply=reply_h[i], benign_reply=reply_b[i],
            harmful_refused=refused_h[i], benign_refused=refused_b[i], used=i in used_set,
            first_diff_offset=None if diff is None or len(h) != len(b) else diff - len(h),
            common_suffix=common_suffix(h, b),
        ))

    def token_infos(ids: list[int], counts_: dict[int, int]) -> list[rs.TokenInfo]:
        return [rs.TokenInfo(id=t, text=tok.decode([t]), count=counts_.get(t, 0)) for t in ids]

    model_cfg = loaded.model.config
    return rs.AuditReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        config=config.model_dump(),
        model=rs.ModelInfo(
            name=loaded.name, source=loaded.source, architecture=model_cfg.model_type,
            adapter=loaded.adapter.family, n_layers=loaded.n_layers, n_heads=loaded.n_heads,
            n_kv_heads=loaded.n_kv_heads, d_model=loaded.d_model,
            n_params=sum(p.numel() for p in loaded.model.parameters()), dtype=config.dtype, device=config.device,
            weights_sha256=loaded.weights_sha256(),
        ),
        dataset=rs.DatasetInfo(
            path=str(dataset_path), sha256=file_sha256(dataset_path), split=config.split, n_pairs=len(pairs),
            n_used=len(used), exclusions=exclusions, exclusion_counts=counts,
            alignment="full" if full_alignment else "right", n_aligned_positions=batch.width if full_alignment
            else suffix,
            tricky_path=str(tricky_path) if tricky_path else None,
            tricky_sha256=file_sha256(tricky_path) if tricky_path else None, n_tricky=len(tricky),
        ),
        metric=rs.MetricInfo(
            form=config.metric,
            definition=(
                "log P(refusal tokens) - log P(compliance tokens)" if config.metric == "logdiff"
                else "log p - log(1 - p), p = P(refusal tokens)"
            ),
            position="last prompt token (the first response position), after the chat template",
            refusal_tokens=token_infos(token_sets.refusal, token_sets.refusal_counts),
            compliance_tokens=token_infos(token_sets.compliance, token_sets.compliance_counts),
            derivation=token_sets.derivation, max_new_tokens=config.max_new_tokens,
        ),
        direction=config.direction,
        method=config.method,
        attribution=attribution_info,
        behaviour=behaviour,
        gap=gap,
        stats=rs.StatsInfo(method=config.ci_method, level=level, n_resamples=config.n_boot, seed=config.seed,
                           n_components=len(components)),
        pairs=pair_results,
        used_pair_ids=batch.pair_ids,
        positions=positions,
        components=results,
        warnings=warnings,
        environment=_environment(),
        engine=_engine_info(engine, loaded, batch),
        runtime_seconds=round(time.perf_counter() - started, 2),
    )
