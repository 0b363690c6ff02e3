"""The package surface: `import minilora` stays torch-free (the CLI starts fast) and every public
name listed in minilora.__all__ resolves to a real object in the module that owns it."""
import subprocess
import sys

import minilora


def test_import_minilora_does_not_import_torch():
    code = "import sys, minilora; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_resolves():
    for name in minilora.__all__:
        obj = getattr(minilora, name)
        assert obj is not None
        assert getattr(obj, "__module__", "").startswith("minilora."), (name, obj)


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        minilora.nope
