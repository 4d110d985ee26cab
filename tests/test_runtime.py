"""Device choice under torchrun and mixed precision only where it is native."""

from __future__ import annotations

import pytest
import torch

from geodiff import runtime


def test_bare_cuda_under_torchrun_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)
    assert runtime.resolve_device("auto") == torch.device("cuda", 1)
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0)  # explicit index kept
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False),
                                                    ((8, 0), True), ((9, 0), True)])
def test_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    dev = torch.device("cuda", 0)
    assert runtime.native_bf16(dev) is native
    ctx = runtime.autocast(dev, "auto")
    assert isinstance(ctx, torch.autocast) is native
    if not native:
        with pytest.raises(ValueError, match="no native bf16"):
            runtime.autocast(dev, "bf16")
    assert not runtime.native_bf16(torch.device("cpu"))


def test_a_device_string_torch_does_not_know_is_a_value_error():
    from geodiff.runtime import resolve_device

    with pytest.raises(ValueError, match="device='gpu' is not a device; use 'auto', 'cpu'"):
        resolve_device("gpu")
