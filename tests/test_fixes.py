"""apply_fixes / check_supported: refusals with reasons, per-instance idempotent patches, the Mamba1 math."""

import dataclasses
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import GPT2Config

from conftest import skip_unless_available
from hf_marconi import conventions, support
from hf_marconi.families import FAMILIES, SUPPORTED_MODEL_TYPES
from hf_marconi.fixes import UnsupportedModelError
from hf_marconi.support import apply_fixes, check_supported
from hf_marconi.fixes.mamba1 import mamba1_initial_state_correction
from hf_marconi.testing import ALL_FAMILIES, build_model, make_config


ALL_FAMILY_PARAMS = skip_unless_available(ALL_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILY_PARAMS)
def test_every_zoo_family_is_supported(family):
    check_supported(make_config(family))
    check_supported(build_model(family))
    assert make_config(family).get_text_config(decoder=True).model_type in SUPPORTED_MODEL_TYPES


def test_unverified_model_type_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*bamba"):
        check_supported(GPT2Config())


def test_hybrid_without_attention_layer_is_refused():
    config = make_config("bamba")
    config.attn_layer_indices = []
    with pytest.raises(UnsupportedModelError, match="no attention layer.*get_seq_length"):
        check_supported(config)


def test_pure_mamba2_model_needs_no_attention_layer():
    check_supported(make_config("mamba2"))


def test_apply_fixes_refuses_what_check_supported_refuses():
    from transformers import BambaForCausalLM

    config = make_config("bamba")
    config.attn_layer_indices = []
    with pytest.raises(UnsupportedModelError):
        apply_fixes(BambaForCausalLM(config))


def test_check_supported_rejects_other_objects():
    with pytest.raises(TypeError, match="transformers model or config"):
        check_supported("bamba")


@pytest.mark.parametrize(
    ("family", "fixes"),
    [("jamba", ["jamba_mamba1_initial_state"]), ("bamba", ["bamba_cache_aware_position_ids"]), ("zamba2", [])],
)
def test_apply_fixes_is_idempotent_and_patches_only_that_instance(family, fixes):
    model = build_model(family)
    untouched = build_model(family)
    forwards_before = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    assert apply_fixes(model) == fixes
    patched = {
        name: module.forward for name, module in model.named_modules() if "forward" in module.__dict__
    }
    assert bool(patched) == bool(fixes)
    assert all(forwards_before[name] is None for name in patched)
    assert apply_fixes(model) == fixes
    assert patched == {name: module.forward for name, module in model.named_modules() if "forward" in module.__dict__}
    assert not any("forward" in module.__dict__ for module in untouched.modules())


def sequential_mamba1_scan(dt, A, B, C, x, initial_state):
    """Reference recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t.

    dt, x: (batch, channels, seq_len); A: (channels, state); B, C: (batch, state, seq_len);
    initial_state: (batch, channels, state). Returns y (batch, channels, seq_len) and the last state.
    """
    state = initial_state
    outputs = []
    for t in range(dt.shape[-1]):
        decay = torch.exp(dt[:, :, t, None] * A[None])
        state = decay * state + dt[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        outputs.append(torch.einsum("bdn,bn->bd", state, C[:, :, t]))
    return torch.stack(outputs, dim=-1), state


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2), channels=st.integers(1, 4), state_size=st.integers(1, 4),
    seq_len=st.integers(1, 9), seed=st.integers(0, 2**16),
)
def test_initial_state_correction_matches_a_scan_from_that_state(batch, channels, state_size, seq_len, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    dt = torch.nn.functional.softplus(randn(batch, channels, seq_len))
    A = -torch.exp(randn(channels, state_size))
    B, C = randn(batch, state_size, seq_len), randn(batch, state_size, seq_len)
    x, initial_state = randn(batch, channels, seq_len), randn(batch, channels, state_size)

    expected_y, expected_state = sequential_mamba1_scan(dt, A, B, C, x, initial_state)
    zero_y, zero_state = sequential_mamba1_scan(dt, A, B, C, x, torch.zeros_like(initial_state))
    y_correction, state_correction = mamba1_initial_state_correction(dt, A, C, initial_state)

    torch.testing.assert_close(zero_y + y_correction, expected_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zero_state + state_correction, expected_state, rtol=1e-12, atol=1e-12)


def test_initial_state_correction_computes_low_precision_inputs_in_float32():
    dt = torch.ones(1, 2, 3, dtype=torch.bfloat16)
    y_correction, state_correction = mamba1_initial_state_correction(
        dt, -torch.ones(2, 4), torch.ones(1, 4, 3, dtype=torch.bfloat16), torch.ones(1, 2, 4, dtype=torch.bfloat16)
    )
    assert y_correction.dtype == state_correction.dtype == torch.float32


def test_fix_that_finds_nothing_to_correct_refuses_the_model():
    """A model that claims a family but lacks the modules the family's fix corrects is refused, not run wrong."""
    model = build_model("llama")
    model.config.model_type = "jamba"
    with pytest.raises(UnsupportedModelError, match="found none of the modules"):
        apply_fixes(model)


def test_transformers_older_than_the_tested_range_is_refused(monkeypatch):
    monkeypatch.setattr(support, "installed_transformers_version", lambda: Version("5.22.0"))
    with pytest.raises(UnsupportedModelError, match="transformers 5.22.0 is older than 5.23.0"):
        check_supported(make_config("bamba"))


def test_transformers_newer_than_the_tested_range_warns_once(monkeypatch):
    monkeypatch.setattr(support, "installed_transformers_version", lambda: Version("5.99.0"))
    monkeypatch.setattr(support, "_warned_unverified", False)
    with pytest.warns(UserWarning, match="newer than 5.24.0.*check_release"):
        check_supported(make_config("bamba"))


def test_declared_range_is_the_tested_range():
    """setup.cfg's transformers bound spans exactly the releases conventions.SUPPORTED_RELEASES names (CI tests the
    first and the last), and the installed release is one of them."""
    import configparser
    from pathlib import Path

    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    requires = [Requirement(line) for line in config["options"]["install_requires"].split("\n") if line.strip()]
    spec = next(r.specifier for r in requires if r.name == "transformers")
    oldest, newest = conventions.SUPPORTED_RELEASES[0], conventions.SUPPORTED_RELEASES[-1]
    assert oldest in spec and newest in spec
    assert Version(f"{newest.major}.{newest.minor + 1}") not in spec, "the upper bound is the next untested minor"
    assert Version(f"{oldest.major}.{oldest.minor - 1}.99") not in spec, "the lower bound is the oldest tested"
    assert Version(conventions.INSTALLED.base_version) in spec


@pytest.mark.parametrize("family", sorted(name for name, record in FAMILIES.items() if record.fixes))
def test_fixes_install_only_on_the_releases_that_need_them(family, monkeypatch):
    """A fix that applies twice is as wrong as a missing one: where a fix's broken_in excludes the installed release
    (as it will once transformers fixes the defect), apply_fixes leaves the model as transformers ships it."""
    record = FAMILIES[family]
    assert apply_fixes(build_model(family)) == [fix.name for fix in record.fixes if fix.needed(conventions.INSTALLED)]
    repaired = dataclasses.replace(
        record, fixes=tuple(dataclasses.replace(fix, broken_in=SpecifierSet("<5.0")) for fix in record.fixes)
    )
    monkeypatch.setattr(support, "family_of", lambda config: repaired)
    model = build_model(family)
    assert apply_fixes(model) == []
    assert not any("forward" in module.__dict__ for module in model.modules())
