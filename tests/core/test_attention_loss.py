"""Stage 2's objective and loop on plain tensors, no host."""

import pytest
import torch

from mace_core.attention_loss import (
    MaskPyramid,
    attention_energy,
    attention_mass,
    check_mask,
    layer_hw,
    mask_from_maps,
    resize_mask,
    sample_timesteps,
    suppressed_positions,
    timestep_probs,
)
from mace_core.errors import MaceInputError
from mace_core.train import TrainConfig, concept_generator, init_lora, train_concepts

END = 99


def test_importance_sampling_puts_most_mass_in_200_to_400():
    p = timestep_probs("importance")
    assert p.shape == (1000,) and abs(float(p.sum()) - 1) < 1e-9
    inside = float(p[200:401].sum())
    assert 0.84 < inside < 0.88, inside  # the paper's "about 86 %"
    draws = sample_timesteps("importance", 20000, torch.Generator().manual_seed(0))
    frac = float(((draws >= 200) & (draws <= 400)).float().mean())
    assert abs(frac - inside) < 0.01
    u = timestep_probs("uniform")
    assert torch.allclose(u, torch.full((1000,), 1e-3, dtype=torch.float64))
    with pytest.raises(MaceInputError, match="timestep_sampling"):
        timestep_probs("cosine")


def test_sampling_is_seeded():
    a = sample_timesteps("uniform", 16, torch.Generator().manual_seed(3))
    b = sample_timesteps("uniform", 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_suppressed_positions_are_concept_words_then_end_and_padding():
    concept = [0, 5, 6, 7, 8, END] + [END] * 4  # start, "a photo of", "Claude Monet" = 7, 8
    anchor = [0, 5, 6, 9, END] + [END] * 5
    assert suppressed_positions(concept, anchor, END, with_end=False) == [3, 4]
    assert suppressed_positions(concept, anchor, END) == [3, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("hw,pixels,expect", [((8, 8), 64, (8, 8)), ((8, 8), 16, (4, 4)), ((9, 7), 20, (5, 4)),
                                              ((64, 96), 6 * 4, (4, 6))])
def test_layer_resolution_follows_unet_halving(hw, pixels, expect):
    assert layer_hw(*hw, pixels) == expect


def test_layer_resolution_rejects_impossible_counts():
    with pytest.raises(ValueError):
        layer_hw(8, 8, 15)


def test_mask_resizing_keeps_area_and_cache():
    m = torch.zeros(1, 8, 8)
    m[:, :4, :] = 1  # top half
    small = resize_mask(m, (2, 2))
    assert torch.allclose(small, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert abs(float(resize_mask(m, (3, 3)).mean()) - 0.5) < 0.1
    big = resize_mask(m, (16, 16))
    assert big.shape == (1, 256) and 0.4 < float(big.mean()) < 0.6
    pyr = MaskPyramid(m, (8, 8))
    assert pyr.at(16) is pyr.at(16) and pyr.at(16).shape == (1, 16)


def test_energy_counts_only_masked_pixels_and_is_per_pixel_head():
    probs = torch.zeros(1, 2, 4, 3)
    probs[0, :, 0] = torch.tensor([0.5, 0.5, 0.0])  # pixel 0: inside
    probs[0, :, 3] = 1.0  # pixel 3: outside the mask
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # inside: pixel 0 gives 0.5 per head, pixel 1 gives 0; mean over 2 pixels x 2 heads
    assert abs(float(attention_energy(probs, mask)) - (0.5 * 2) / 4) < 1e-6
    assert abs(float(attention_mass(probs, mask)) - (1.0 * 2) / 4) < 1e-6
    assert float(attention_energy(probs, torch.zeros(1, 4))) == 0.0  # empty mask: no loss, no NaN


def test_energy_gradient_pushes_probabilities_down():
    logits = torch.randn(1, 2, 4, 5, requires_grad=True)
    probs = logits.softmax(-1)[..., :2]
    attention_energy(probs, torch.ones(1, 4)).backward()
    # lowering the selected tokens' logits lowers the loss
    assert float(logits.grad[..., :2].sum()) > 0


def test_mask_from_maps_thresholds_at_the_mean():
    a = torch.zeros(1, 4, 4)
    a[0, 1:3, 1:3] = 1.0
    coarse = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]) + a.mean()
    m = mask_from_maps([a, coarse], (4, 4))
    assert m.shape == (1, 4, 4) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[0, 1:3, 1:3].all() and m.sum() == 4


def test_check_mask_shapes():
    assert check_mask(torch.ones(4, 64, 64), 4, (8, 8)).shape == (4, 64, 64)
    assert check_mask(torch.ones(1, 8, 8), 3, (8, 8)).shape == (3, 8, 8)
    assert check_mask(torch.ones(8, 8), 2, (8, 8)).shape == (2, 8, 8)
    for bad in (torch.ones(3, 8, 8), torch.ones(2, 8, 16), torch.ones(2, 1, 8, 8)):
        with pytest.raises(MaceInputError, match="'mask'"):
            check_mask(bad, 2, (8, 8))


class _Quadratic:
    """A toy task: the LoRA should learn to cancel a fixed key projection (loss = |(W + up down) x|^2)."""

    def __init__(self, gen):
        self.w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
        self.up, self.down = init_lora({"k": (4, 3)}, 1, gen)

    def parameters(self):
        return [self.up["k"], self.down["k"]]

    def loss(self, step, gen):
        x = torch.randn(3, 8, generator=gen)
        return ((self.w + self.up["k"] @ self.down["k"]) @ x).square().mean()


def test_loop_lowers_loss_reports_progress_and_repeats_with_seed():
    calls = []
    cfg = TrainConfig(steps=60, learning_rate=5e-2, seed=7)
    runs = [train_concepts(2, lambda i, g: _Quadratic(g), cfg, lambda: calls.append(1)) for _ in range(2)]
    assert len(calls) == 2 * 2 * 60
    (t1, l1), (t2, l2) = runs[0]
    assert l1[-1] < l1[0] and len(l1) == 60
    assert torch.equal(t1.down["k"], runs[1][0][0].down["k"]) and l1 == runs[1][0][1]
    assert not torch.equal(t1.down["k"], t2.down["k"]), "concepts get independent streams"
    assert concept_generator(7, 0).initial_seed() != concept_generator(7, 1).initial_seed()


def test_loop_cancel_and_bad_config():
    class Stop(Exception):
        pass

    def cancel():
        raise Stop

    with pytest.raises(Stop):
        train_concepts(1, lambda i, g: _Quadratic(g), TrainConfig(steps=5), cancel)
    with pytest.raises(MaceInputError, match="'steps'"):
        train_concepts(1, lambda i, g: _Quadratic(g), TrainConfig(steps=0))
    with pytest.raises(MaceInputError, match="'learning_rate'"):
        train_concepts(1, lambda i, g: _Quadratic(g), TrainConfig(learning_rate=0.0))
