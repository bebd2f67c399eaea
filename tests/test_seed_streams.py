"""The trainer's random streams never share a seed: a rollout's initial noise, each rank's step noise, trained-step
choice and update draws, and each group's window start come from distinct generators for any group size and world
size (before, member 11 of group r repeated rank r's step noise in groups of 12 or more, and a group's window start
was drawn from member 7's generator)."""

from __future__ import annotations

import torch

from flowalign.samplers.loop import mix_seed as _seed
from flowalign.train import RANK_STREAMS, init_noise_seed, rank_stream_seed, window_seed


def test_no_two_streams_of_an_iteration_share_a_seed():
    seed, it, groups, size, world = 42, 3, 8, 24, 4  # the SD3.5 reference group size
    keys = [init_noise_seed(seed, it, g, m) for g in range(groups) for m in range(size)]
    keys += [rank_stream_seed(seed, it, r, s) for r in range(world) for s in RANK_STREAMS]
    keys += [window_seed(seed, it, g) for g in range(groups)]
    assert len(set(keys)) == len(keys)


def test_member_noise_is_independent_of_the_step_noise():
    """The draw that collided: x_1 of member 11 of group 0 vs the first values of rank 0's step-noise stream."""
    shape = (3, 4, 4)
    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(init_noise_seed(0, 0, 0, 11)))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(rank_stream_seed(0, 0, 0, "step_noise")))
    assert not torch.allclose(x1, eps)


def test_keys_of_groups_smaller_than_the_tags_are_unchanged():
    """Members below the first tag keep the (seed, it, group, member) key, so runs with groups of up to 11 (every
    shapes config and every documented shapes run but two) draw the same initial noise as before the rule."""
    assert min(RANK_STREAMS.values()) == 11
    for m in range(11):
        assert init_noise_seed(5, 2, 1, m) == _seed(5, 2, 1, m)
    assert rank_stream_seed(5, 2, 1, "step_noise") == _seed(5, 2, 1, 11)


def test_step_noise_streams_of_sample_and_steer_never_start_from_an_initial_noise():
    """`flowalign sample` and `steer` draw an image's (an output's) SDE step noise from step_noise_seed(its initial
    seed). It was init·7919 + 1: at run seed 0, image 0 of prompt 0 took its step noise from seed 1, the initial noise
    of image 1 (of particle 1 of the same steered output). The CPU generator reads the low 32 bits only."""
    from flowalign.evaluate import image_seed, step_noise_seed

    for run_seed in (0, 1, 7, 42):
        inits = {image_seed(run_seed, i, k) % 2**32 for i in range(240) for k in range(64)}
        inits |= {image_seed(run_seed, i, k) % 2**32 for i in range(4) for k in range(1009, 1100)}  # the far range
        steps = {step_noise_seed(sd) % 2**32 for sd in inits}
        assert not steps & inits and len(steps) == len(inits)
    eps = torch.randn(8, generator=torch.Generator().manual_seed(step_noise_seed(image_seed(0, 0, 0))))
    x1 = torch.randn(8, generator=torch.Generator().manual_seed(image_seed(0, 0, 1)))
    assert not torch.allclose(eps, x1)
    assert step_noise_seed(image_seed(0, 0, 0)) != image_seed(0, 0, 1)


def test_step_noise_seed_is_the_splitmix_hash_of_the_initial_seed_in_32_bits():
    """step_noise_seed(init) = splitmix64(init XOR 0x5DEECE66D) mod 2**32 (evaluate.step_noise_seed): the low 32 bits
    the CPU generator uses, a value below 2**32; `sample` and `steer` outputs are reproducible only if it stays so.
    (evaluate._splitmix64 is pinned to the reference test vectors in tests/test_evaluate.py.)"""
    from flowalign.evaluate import _splitmix64, image_seed, step_noise_seed

    for init in (0, 1, 1009, image_seed(42, 17, 3), image_seed(3, 2, 5000), 2**64 - 1):
        s = step_noise_seed(init)
        assert 0 <= s < 2**32
        assert s == _splitmix64(init ^ 0x5DEECE66D) % 2**32
