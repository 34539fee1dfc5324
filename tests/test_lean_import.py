import subprocess
import sys


def test_import_is_lean():
    heavy = "('torch', 'transformers', 'bitsandbytes')"
    code = f"import sys, hf_modelopt; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_api_resolves():
    import hf_modelopt

    for name in hf_modelopt.__all__:
        assert getattr(hf_modelopt, name) is not None
