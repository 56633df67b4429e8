"""A seeded 2,000-case run of benchmarks/fuzz_packs.py: every mutated pack is refused cleanly
(a one-line PackError) or accepted byte-identically. The 100,000-case run is recorded in
benchmarks/results/fuzz_packs.json."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_2000_mutated_packs_are_refused_cleanly_or_accepted_identically():
    pytest.importorskip("torch")  # the seed packs use the demo base's real layer shapes
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import fuzz_packs

    fuzz_packs.NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    packs = list(fuzz_packs.seed_packs(key).values())
    report = fuzz_packs.run(2000, seed=12, packs=packs, private_key=key)
    assert report["unclean"] == 0, report["unclean_examples"][:5]
    # the mix reaches every stage: signature, envelope, body limits, and real acceptances
    outcomes = report["outcomes"]
    for stage in ("refused/BadSignatureError", "refused/MalformedPackError", "refused/PackLimitError",
                  "accepted/identical"):
        assert outcomes.get(stage, 0) >= 20, outcomes
