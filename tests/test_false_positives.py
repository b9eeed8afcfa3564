"""False positives: the default audit of random-weight chat models (no refusal circuit exists) must report none.

Three architectures x 5 seeds, each with the tiny-refuser's chat tokenizer and the default options (eval split,
token sets from the train split's replies, every guard on). Bootstrap and permutation counts are lowered to keep
the suite fast, the noise floor is off (it can only remove significance, so the test is stricter without), and
only the last position is patched: the verdicts tested (behaviour, gap, shares undefined, nothing significant) come
before patching, and the default positions' effects are in BENCHMARKS.md.
The table with every number is in BENCHMARKS.md (benchmarks/null_models.py).
"""

from __future__ import annotations

import pytest

from refusal_eval import AuditConfig, audit
from refusal_eval.null_models import ARCHITECTURES, save_random_chat_model

pytestmark = pytest.mark.slow

SEEDS = range(5)


@pytest.fixture(scope="module")
def null_reports(tmp_path_factory):
    reports = {}
    for arch in ARCHITECTURES:
        for seed in SEEDS:
            folder = save_random_chat_model(tmp_path_factory.mktemp("null") / f"random-{arch}-{seed}", arch, seed)
            config = AuditConfig(model=str(folder), n_boot=500, n_permutations=1000, tricky="", noise_floor=False,
                                 positions=["last"])
            reports[arch, seed] = audit(config, progress=False)
    return reports


def test_random_models_show_no_refusal_circuit(null_reports):
    clean = [key for key, r in null_reports.items()
             if not r.gap.separated and not any(c.significant for c in r.components)]
    assert len(clean) >= 14, f"false circuits in {sorted(set(null_reports) - set(clean))}"
    for r in null_reports.values():
        # the behaviour gate alone already refuses to localise: none of them refuses measurably
        assert r.behaviour.refuses is False and r.shares_defined is False
        assert all(c.share is None for c in r.components)
        assert r.metric.token_set_source != "scored pairs (schema 1.0: circular)"


def test_every_pair_is_scored_in_random_models(null_reports):
    for r in null_reports.values():
        assert r.dataset.n_used == r.gap.n_pairs == r.gap_all_pairs.n_pairs == 77
        assert not any(e.reason == "baseline_wrong_sign" for e in r.dataset.exclusions)
