"""`init_module_state` gives a module exactly what `nn.Module.__init__` would, and it works as one."""

from __future__ import annotations

import torch
from torch import nn

from lwformat.adapters import module_state
from lwformat.adapters.host import AdapterHost
from lwformat.adapters.kinds import KINDS, SlotSettings
from lwformat.adapters.layers import geometry
from lwformat.adapters.module_state import init_module_state, new_module_dict


def _shape(module: nn.Module) -> dict:
    return {name: (type(value), value if not isinstance(value, (dict, set)) else len(value)) for name, value in vars(module).items()}


def test_the_state_is_read_off_this_torch_and_used():
    assert module_state._PLAIN, "nn.Module() holds something other than flags and empty containers: the fast path is off"


def test_same_state_as_module_init_with_containers_of_its_own():
    real, fast = nn.Module(), nn.Module.__new__(nn.Module)
    init_module_state(fast)
    assert _shape(fast) == _shape(real)
    other = nn.Module.__new__(nn.Module)
    init_module_state(other)
    shared = [n for n, v in vars(fast).items() if isinstance(v, (dict, set)) and v is vars(other)[n]]
    assert shared == []
    assert _shape(new_module_dict()) == _shape(nn.ModuleDict())


def test_hosts_and_adapters_built_so_behave_as_modules():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    host = AdapterHost(layer, geometry(layer))
    settings = SlotSettings("lora", rank=2, alpha=4.0)
    adapter = KINDS["lora"](geometry(layer), settings, layer)
    torch.nn.init.normal_(adapter.lora_B)
    host.add("a", adapter, 0.5)
    calls = []
    host.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    x = torch.randn(3, 6)
    y = host(x)
    assert calls == [(3, 5)]
    assert torch.allclose(y, layer(x) + 0.5 * 2.0 * (x @ adapter.lora_A.T @ adapter.lora_B.T), atol=1e-6)
    assert sorted(dict(host.named_parameters())) == ["adapters.a.lora_A", "adapters.a.lora_B", "base.bias", "base.weight"]
    assert set(host.state_dict()) == {"adapters.a.lora_A", "adapters.a.lora_B", "base.bias", "base.weight"}
    host.eval()
    assert not adapter.training and not host.adapters.training
    assert host.double().base.weight.dtype == torch.float64 and adapter.lora_A.dtype == torch.float64
