"""PEFT as a second oracle for specops' LoHa and LoKr (Linear and conv, plain and Tucker forms).

PEFT keeps LoHa / LoKr in LyCORIS's parameter layout (hada_w1_a, ..., lokr_t2) with scale
alpha / r. Its randomly initialised adapters (init_weights=False: every factor non-zero) are
written as a LyCORIS file, read by specops' lycoris_adapters, and the two models must agree.
"""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

peft = pytest.importorskip("peft")

from specops import lora_io  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 12, 1)
        self.lin = nn.Linear(12, 18)

    def forward(self, x):
        h = self.point(self.conv(x))
        return self.lin(h.permute(0, 2, 3, 1))


def _peft_model(config):
    torch.manual_seed(0)
    net = _Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    return peft.inject_adapter_in_model(config, net), base


def _as_lycoris_file(model, path, alpha):
    """PEFT's adapter tensors under LyCORIS's keys, "lycoris_<module>.<role>", with the alpha."""
    tensors = {}
    for name, p in model.named_parameters():
        module, _, rest = name.partition(".")
        role, _, adapter = rest.rpartition(".")
        if role.startswith(("hada_", "lokr_")) and adapter == "default":
            tensors[f"lycoris_{module}.{role}"] = p.detach().clone()
            tensors[f"lycoris_{module}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return tensors


def _specops_model(base, path):
    net = _Net()
    net.load_state_dict(base)
    for name, adapter in lora_io.lycoris_adapters(path, net).items():
        setattr(net, name.partition(".")[2], adapter)
    return net


CASES = {  # id: (PEFT config, alpha)
    "loha": (lambda: peft.LoHaConfig(r=3, alpha=2.0, target_modules=["conv", "point", "lin"], init_weights=False,
                                     use_effective_conv2d=False), 2.0),
    "loha-tucker": (lambda: peft.LoHaConfig(r=3, alpha=5.0, target_modules=["conv", "point", "lin"], init_weights=False,
                                            use_effective_conv2d=True), 5.0),
    "lokr-factored": (lambda: peft.LoKrConfig(r=1, alpha=3.0, target_modules=["conv", "point", "lin"], init_weights=False,
                                              decompose_both=True), 3.0),
    "lokr-tucker": (lambda: peft.LoKrConfig(r=1, alpha=0.5, target_modules=["conv"], init_weights=False,
                                            use_effective_conv2d=True), 0.5),
    # a rank past half the factor sizes keeps both factors dense: LyCORIS's scale is then 1, PEFT's
    # alpha / r, so alpha = r makes them the same update
    "lokr-dense": (lambda: peft.LoKrConfig(r=8, alpha=8.0, target_modules=["conv", "point", "lin"], init_weights=False), 8.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loha_lokr_equal_specops(tmp_path, case):
    make_config, alpha = CASES[case]
    model, base = _peft_model(make_config())
    path = tmp_path / "peft.safetensors"
    roles = {k.partition(".")[2] for k in _as_lycoris_file(model, path, alpha)}
    if "tucker" in case:
        assert {"hada_t1", "lokr_t2"} & roles
    if case == "lokr-factored":
        assert {"lokr_w1_a", "lokr_w2_a"} <= roles
    if case == "lokr-dense":
        assert {"lokr_w1", "lokr_w2"} <= roles and not {"lokr_w1_a", "lokr_w2_a"} & roles
    ours = _specops_model(base, path)
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), ours(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        plain = _Net()
        plain.load_state_dict(base)
        assert (want - plain(x)).abs().max().item() > 1e-3  # the adapters do change the output
    for name, module in model.named_modules():  # and layer by layer, the same ΔW
        if hasattr(module, "get_delta_weight"):
            torch.testing.assert_close(getattr(ours, name).delta_weight(), module.get_delta_weight("default"),
                                       rtol=1e-5, atol=1e-6)
