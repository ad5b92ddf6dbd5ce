"""The erasure scores' per-concept breakdown adds up to the scores, on a smoke world (whose drawings are mostly
wrong, so every kind of miss occurs) and its real ComfyUI sampler."""

import torch
from world_support import pack_import


def _count(entry: str) -> tuple[int, int]:
    k, n = entry.split(" ")[0].split("/")
    return int(k), int(n)


def test_misses_add_up_to_the_scores(smoke_world):
    ee = pack_import("concept_world.erasure_eval")
    spec = pack_import("concept_world.spec")
    erased = ee.ORDER[:2]
    seeds = range(2)
    with torch.inference_mode():
        s = ee.scores(smoke_world, smoke_world.model, erased, seeds, detail=True)
        plain = ee.scores(smoke_world, smoke_world.model, erased, seeds)
    assert {k: v for k, v in s.items() if k != "misses"} == plain, "the breakdown must not change the scores"
    kept = len(spec.CONCEPTS) - len(erased)
    cases = {"acc_e": len(erased) * len(seeds), "acc_g": len(erased) * len(seeds), "acc_s": kept * len(seeds)}
    for key, per in s["misses"].items():
        counted = [_count(v) for v in per.values()]
        assert all(n == len(seeds) and 0 < k <= n for k, n in counted), per
        wrong = sum(k for k, _ in counted)
        drawn = wrong if key != "acc_s" else cases[key] - wrong
        assert abs(drawn / cases[key] - s[key]) < 1e-9, (key, per, s[key])
        names = set(erased) if key != "acc_s" else {c.name for c in spec.CONCEPTS} - set(erased)
        assert set(per) <= names, (key, per)
    assert all(" as " in v for v in s["misses"]["acc_s"].values())
    assert s["misses"]["acc_s"], "a smoke world cannot draw 18 concepts right: the kept misses must be listed"
