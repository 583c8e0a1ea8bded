"""Optional dependencies: hardneg imports without the trainers; an adapter without its extra names it."""

import importlib
import subprocess
import sys

import pytest

from hardneg._optional import MissingExtraError


def test_import_hardneg_and_integrations_loads_no_trainer():
    code = ("import sys, hardneg, hardneg.integrations; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("adapter, module, extra", [
    ("lightning", "lightning.pytorch", "lightning"),
    ("transformers", "transformers", "transformers"),
    ("accelerate", "accelerate", "accelerate"),
    ("accelerate", "accelerate.utils", "accelerate"),
])
def test_adapter_without_its_extra_raises_naming_the_extra(monkeypatch, adapter, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails like an absent package
    monkeypatch.delitem(sys.modules, f"hardneg.integrations.{adapter}", raising=False)
    with pytest.raises(MissingExtraError, match=rf"pip install 'hardneg\[{extra}\]'") as info:
        importlib.import_module(f"hardneg.integrations.{adapter}")
    assert isinstance(info.value, ImportError)  # `except ImportError` still catches it


def test_timm_adapter_needs_no_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.delitem(sys.modules, "hardneg.integrations.timm", raising=False)
    module = importlib.import_module("hardneg.integrations.timm")
    assert callable(module.HardNegTimm)
