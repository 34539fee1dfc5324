import subprocess
import sys

import pytest


def test_import_is_lean():
    heavy = "('torch', 'transformers', 'bitsandbytes')"
    code = f"import sys, hf_modelopt; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_api_resolves_to_the_named_objects():
    import hf_modelopt

    for name in hf_modelopt.__all__:
        obj = getattr(hf_modelopt, name)
        assert obj.__name__ == name and obj.__module__ == f"hf_modelopt.{hf_modelopt._EXPORTS[name]}"
    assert "cubic_sparsity" not in hf_modelopt.__all__  # the rest stays in the sub-packages
    with pytest.raises(AttributeError, match="no attribute 'prune_oneshot_'"):
        getattr(hf_modelopt, "prune_oneshot_")  # noqa: B009  (the attribute lookup is what is tested)
