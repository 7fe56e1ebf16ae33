"""Parameters, GFLOPs, peak memory and step time of a model (gem.efficiency)."""

import math
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from gem.efficiency import count_parameters, efficiency_report, gflops_per_image, peak_memory, time_steps


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))


def test_count_parameters_shared_and_frozen():
    net = small_net()
    assert count_parameters(net) == (8 * 3 * 9 + 8) + (8 * 16 * 16 * 10 + 10)
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied) == 16
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == count_parameters(net) - 8 * 3 * 9


def test_gflops_counts_multiply_adds_twice_on_one_image():
    net = small_net()
    # conv: 16*16 outputs x 8 channels x (3*3*3) MACs; linear: 2048 x 10 MACs; FLOPs = 2 x MACs
    expected = 2 * (16 * 16 * 8 * 27 + 2048 * 10) / 1e9
    one = gflops_per_image(net, torch.randn(1, 3, 16, 16))
    assert one == pytest.approx(expected, rel=1e-12)
    assert gflops_per_image(net, torch.randn(5, 3, 16, 16)) == pytest.approx(expected, rel=1e-12)
    # a custom forward, and the model's training mode is restored
    net.train()
    half = gflops_per_image(lambda x: net[0](x), torch.randn(2, 3, 16, 16), model=net)
    assert half == pytest.approx(2 * 16 * 16 * 8 * 27 / 1e9) and net.training


@pytest.mark.skipif(torch.cuda.is_available() or not sys.platform.startswith("linux"),
                    reason="the CPU peak-RSS path is Linux-only; CUDA measures allocator memory")
def test_peak_memory_sees_a_temporary_allocation_on_cpu():
    def allocate():
        block = np.ones(16 * 1024 * 1024)   # 128 MiB, freed on return
        return float(block[::4096].sum())

    result = peak_memory(allocate)
    assert result["memory_kind"] == "cpu_peak_rss"
    assert result["peak_memory_increase_mib"] >= 100
    assert result["peak_memory_mib"] >= result["peak_memory_increase_mib"]
    quiet = peak_memory(lambda: None)
    assert quiet["peak_memory_increase_mib"] < 50


def test_time_steps_counts_calls_and_epochs():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.005)

    result = time_steps(step, n_steps=4, warmup=2, steps_per_epoch=100, device="cpu")
    assert len(calls) == 6 and result["n_steps"] == 4
    assert result["seconds_per_step"] >= 0.005
    assert result["seconds_per_epoch"] == pytest.approx(100 * result["seconds_per_step"])
    assert math.isnan(time_steps(step, n_steps=1, warmup=0, device="cpu")["seconds_per_epoch"])
    with pytest.raises(ValueError):
        time_steps(step, n_steps=0)


def test_efficiency_report_keys():
    net = small_net()
    x = torch.randn(4, 3, 16, 16)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()

    report = efficiency_report(net, x, step=step, n_steps=2, warmup=1, steps_per_epoch=10, device="cpu")
    assert report["params_m"] == pytest.approx(count_parameters(net) / 1e6)
    assert report["trainable_params_m"] == report["params_m"]
    assert report["gflops_per_image"] == pytest.approx(gflops_per_image(net, x))
    for key in ("peak_memory_mib", "peak_memory_increase_mib", "memory_kind", "seconds_per_step",
                "seconds_per_step_median", "seconds_per_step_std", "n_steps", "seconds_per_epoch"):
        assert key in report
    assert set(efficiency_report(net, x)) == {"params_m", "trainable_params_m", "gflops_per_image"}
