"""Third-party interventions from the ``attnkit.interventions`` entry-point group: usable by name in YAML, attach,
the CLI and the lm-eval plug-in; a broken plug-in warns and is skipped."""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.interventions import INTERVENTIONS, load_builtin, load_plugins
from attnkit.recipes import RecipeError, loads_recipe
from attnkit.testing import tiny_causal_lm

_COUNTER = itertools.count()
ROOT = Path(__file__).resolve().parents[2]
PLUGIN = textwrap.dedent('''
    import torch
    from attnkit.interventions import Intervention


    class ScaleOut(Intervention):
        """Multiplies every targeted head's output by ``gain``."""

        name = "{name}"

        def __init__(self, gain: float = 0.5, **target):
            super().__init__(**target)
            self.gain = gain

        def edit_output(self, out, ctx):
            return out * self.gain
''')


def make_distribution(folder: Path, module: str, name: str, entry: str | None = None) -> Path:
    """A minimal installed distribution on ``folder``: a module plus ``*.dist-info`` with ``entry_points.txt``."""
    (folder / f"{module}.py").write_text(PLUGIN.format(name=name))
    info = folder / f"{module}-0.1.dist-info"  # as wheels name it: the name with underscores, then the version
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[attnkit.interventions]\n{name} = {entry or f'{module}:ScaleOut'}\n")
    return folder


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in ``scale-out`` installed on sys.path for this test (unregistered afterwards), after the built-ins
    were loaded: as if it had been installed while the process runs."""
    load_builtin()
    module = f"attnkit_scale_out_{next(_COUNTER)}"  # a new entry point each time (each is loaded once)
    make_distribution(tmp_path, module, "scale-out")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "scale-out" not in INTERVENTIONS
    yield tmp_path
    if "scale-out" in INTERVENTIONS:
        INTERVENTIONS.unregister("scale-out")
    sys.modules.pop(module, None)


RECIPE = "name: plugged\nversion: 1\ninterventions:\n  - method: scale-out\n    layers: [0]\n    params: {gain: 0.25}\n"


def test_plugin_is_usable_in_yaml_and_attach(plugin):
    assert "scale-out" not in INTERVENTIONS
    recipe = loads_recipe(RECIPE)  # an unknown name makes the loader look for newly installed plug-ins
    assert INTERVENTIONS.get("scale-out").__module__.startswith("attnkit_scale_out_")
    assert load_plugins() == []  # loaded once
    with pytest.raises(RecipeError, match=r"unknown parameter 'gian'.*did you mean 'gain'"):
        loads_recipe(RECIPE.replace("gain:", "gian:"))
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        stock = model(ids).logits
        with attnkit.attach(model, recipe) as handle:
            edited = model(ids).logits
        assert handle.report()["calls"]["scale-out"] == 1
        # independent reference: the same edit through a forward hook on layer 0's o_proj input
        attn = model.model.layers[0].self_attn
        hook = attn.o_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 0.25,))
        try:
            reference = model(ids).logits
        finally:
            hook.remove()
    assert not torch.allclose(edited, stock)
    torch.testing.assert_close(edited, reference, rtol=1e-5, atol=1e-5)


def test_load_plugins_returns_new_names(plugin):
    assert load_plugins() == ["scale-out"]
    assert load_plugins() == []


def test_broken_plugin_warns_and_is_skipped(tmp_path, monkeypatch):
    load_builtin()
    make_distribution(tmp_path, "attnkit_broken_plugin", "broken-one", entry="attnkit_broken_plugin:Missing")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipped intervention plug-in 'broken-one'.*attnkit-broken-plugin"):
        assert load_plugins() == []
    assert "broken-one" not in INTERVENTIONS
    sys.modules.pop("attnkit_broken_plugin", None)


def test_plugin_may_not_take_a_builtin_name(tmp_path, monkeypatch):
    load_builtin()
    make_distribution(tmp_path, "attnkit_fake_noop", "noop")
    monkeypatch.syspath_prepend(str(tmp_path))
    builtin = INTERVENTIONS.get("noop")
    with pytest.warns(UserWarning, match="already registered"):
        load_plugins()
    assert INTERVENTIONS.get("noop") is builtin
    sys.modules.pop("attnkit_fake_noop", None)


def test_plugin_is_usable_from_the_cli(plugin):
    recipe = plugin / "plugged.yaml"
    recipe.write_text(RECIPE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(plugin)]))
    out = subprocess.run([sys.executable, "-m", "attnkit.cli", "show", str(recipe)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "method: scale-out" in out.stdout and "gain: 0.25" in out.stdout
    env["PYTHONPATH"] = str(ROOT)  # without the plug-in on the path the name is unknown
    out = subprocess.run([sys.executable, "-m", "attnkit.cli", "show", str(recipe)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "unknown method 'scale-out'" in out.stderr


@pytest.mark.slow
def test_plugin_is_usable_from_the_lm_eval_plugin(plugin, smollm2):
    lm_eval_plugin = pytest.importorskip("attnkit.eval.lm_eval_plugin")
    recipe = plugin / "plugged.yaml"
    recipe.write_text(RECIPE)
    model, tok = smollm2
    lm = lm_eval_plugin.AttnkitLM(pretrained=model, tokenizer=tok, recipe=str(recipe), batch_size=1)
    try:
        assert [iv.name for iv in lm.handle.interventions] == ["scale-out"]
        assert lm.handle.interventions[0].gain == 0.25
    finally:
        lm.detach()
