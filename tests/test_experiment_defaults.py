"""The default runs of ``rings``, ``gamma`` and ``deep`` stay a few minutes on a 2-core CPU while keeping
the protocol they report (Sander et al. 2021, Figs. 1 and 6; Chang et al. 2018, Hamiltonian-1202), and
the γ sweep's network is laid out as the authors' Momentum ResNets (a plain first block per stage)."""

import pytest
import torch

from revnets.experiments import get_experiment
from revnets.experiments.gamma import make_network
from revnets.models.layers import BasicBlock
from revnets.nn import MomentumNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rings_default_is_three_seeds_of_the_authors_protocol():
    config = get_experiment("rings").make_config()
    assert config.seeds == 3
    # the authors' run_separation_nested_rings.py, per seed: the same for the demo and for --seeds 5
    assert (config.momentum_steps, config.momentum_lr, config.resnet_steps, config.resnet_lr) == (1500, 0.2, 5000, 0.01)
    assert (config.rings, config.depth, config.hidden, config.gamma, config.points_per_step) == (4, 15, 16, 0.99, 4000)
    # runtime bound: ~11 ms per step of 4,000 points on one thread, so about 3.5 min of CPU
    assert config.seeds * (config.momentum_steps + config.resnet_steps) * config.points_per_step <= 3 * 6500 * 4000


def test_rings_five_seeds_is_the_documented_paper_size_run():
    experiment = get_experiment("rings")
    default, five = experiment.make_config(), experiment.make_config(seeds=5)
    assert five.seeds == 5
    assert {**vars(five), "seeds": default.seeds} == vars(default)


def test_gamma_default_sweeps_zero_to_one_with_the_authors_layout():
    config = get_experiment("gamma").make_config()
    assert config.plain_first_block
    assert config.gammas[0] == 0.0 and {0.9, 0.99, 1.0} <= set(config.gammas)
    assert len(config.gammas) * config.seeds * config.steps <= 12 * 3 * 200  # about 3.5 min of CPU


@pytest.mark.parametrize("plain_first_block", [True, False])
def test_gamma_network_is_a_plain_block_then_a_momentum_stack(plain_first_block):
    config = get_experiment("gamma").make_config(channels=4, depth=3, plain_first_block=plain_first_block)
    model = make_network(config, 1, 10, gamma=0.9)
    stacks = [m for m in model if isinstance(m, MomentumNet)]
    assert len(stacks) == 1 and len(stacks[0].functions) == (2 if plain_first_block else 3)
    assert sum(isinstance(m, BasicBlock) for m in model) == int(plain_first_block)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_gamma_one_makes_the_momentum_stack_the_identity():
    """At γ = 1 with v₀ = 0 the velocity never leaves 0: only the layers outside the stack act, which is why
    an all-momentum stage collapses to its stem near γ = 1 and the authors' layout does not."""
    torch.manual_seed(0)
    config = get_experiment("gamma").make_config(channels=4, depth=3)
    model = make_network(config, 1, 10, gamma=1.0).eval()
    without_stack = torch.nn.Sequential(*[m for m in model if not isinstance(m, MomentumNet)])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), without_stack(x))


def test_deep_default_keeps_every_depth_on_one_thread():
    config = get_experiment("deep").make_config()
    assert config.threads == 1
    assert config.depths == [38, 110, 218, 1202] and config.train_depth == 1202
    assert config.train_steps * config.batch_size <= 30 * 32
