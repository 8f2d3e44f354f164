"""Study specs: the shipped ones load, and every kind of bad spec gets one clear message."""

from __future__ import annotations

import json

import pytest
from helpers import sweeper, write_spec

from sweeper import spec


def test_shipped_specs_load_with_the_seed_grid():
    specs = {s.name: s for s in map(lambda p: spec.load(str(p)), spec.available())}
    assert {"cifar100-depth", "cifar10-depth", "googlenet-depth", "quickstart", "cifar100-search"} <= set(specs)
    seven = ["naive", "standard", "long", "short", "short2", "short3", "short4"]
    for name, dataset in (("cifar100-depth", "cifar100"), ("cifar10-depth", "cifar10")):
        s = specs[name]
        assert s.grid["variant"] == seven and s.grid["dataset"] == [dataset]
        assert s.train == {"epochs": 14, "batch_size": 64, "optimizer": "adadelta", "lr": 1.0, "lr_gamma": 0.7}
    assert len(specs["googlenet-depth"].cells) == 14
    assert specs["quickstart"].grid["dataset"] == ["digits"] and len(specs["quickstart"].cells) == 7
    search = specs["cifar100-search"]
    assert search.search["sampler"] == "tpe" and search.search["pruner"] == "median"
    assert set(search.search["space"]) == {"lr", "lr_gamma", "batch_size"}
    assert len(search.trial_keys()) == 2 * search.trials_per_cell


def test_studies_command_lists_specs(sweeper_env, tmp_path):
    rows = json.loads(sweeper("studies", "--format", "json", env=sweeper_env, cwd=tmp_path).stdout)
    by_name = {r["study"]: r for r in rows}
    # Run outside the checkout: these come from the specs shipped inside the package.
    assert by_name["googlenet-depth"]["cells"] == 14
    assert by_name["cifar100-search"]["trials"] == 40
    assert "CIFAR-100" in by_name["cifar100-depth"]["description"]


def test_hash_ignores_description_but_not_recipe(tmp_path):
    a = spec.load(str(write_spec(tmp_path / "a.toml")))
    b_path = write_spec(tmp_path / "b.toml")
    b_path.write_text(b_path.read_text().replace("test study", "another description"))
    c = spec.load(str(write_spec(tmp_path / "c.toml", epochs=3)))
    assert a.hash == spec.load(str(b_path)).hash
    assert a.hash != c.hash


BAD_SPECS = [
    ("malformed", "[grid\nvariant = 1", ["not valid TOML"]),
    (
        "unknown top key",
        'descripton = "x"\n[grid]\nvariant=["short4"]\ndataset=["digits"]',
        ["'descripton'", "allowed: description"],
    ),
    ("unknown variant", '[grid]\nvariant=["shot4"]\ndataset=["digits"]', ["grid.variant", "'shot4'", "short4"]),
    ("unknown dataset", '[grid]\nvariant=["short4"]\ndataset=["cifar1000"]', ["grid.dataset", "cifar100"]),
    (
        "wrong type",
        '[grid]\nvariant=["short4"]\ndataset=["digits"]\n[train]\nepochs = "three"',
        ["train.epochs", "integer"],
    ),
    (
        "unknown recipe key",
        '[grid]\nvariant=["short4"]\ndataset=["digits"]\n[train]\nepoch = 3',
        ["train.epoch: unknown recipe key", "allowed"],
    ),
    (
        "unknown optimizer",
        '[grid]\nvariant=["short4"]\ndataset=["digits"]\n[train]\noptimizer = "adam"',
        ["optimizer", "adadelta, sgd, adamw"],
    ),
    (
        "unknown sampler",
        '[grid]\nvariant=["short4"]\ndataset=["digits"]\n[search]\nsampler = "bayes"\n[search.space]\nlr = {low=0.1, high=1.0}',
        ["search.sampler", "'bayes'", "tpe"],
    ),
    (
        "bad space",
        '[grid]\nvariant=["short4"]\ndataset=["digits"]\n[search]\n[search.space]\nlr = {low=2.0, high=1.0}',
        ["search.space.lr", "low < high"],
    ),
]


@pytest.mark.parametrize("case, text, needles", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_one_clear_message_and_touches_nothing(case, text, needles, sweeper_env, tmp_path):
    from click.testing import CliRunner

    from sweeper.cli import cli

    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["launch", "--study", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert str(path) in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert list((tmp_path / "home").iterdir()) == [], "nothing may be written before the spec is valid"


def test_bad_spec_through_the_real_entry_point_has_no_traceback(sweeper_env, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[grid]\nvariant=["shot4"]\ndataset=["digits"]')
    proc = sweeper("launch", "--study", str(path), env=sweeper_env, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "grid.variant" in proc.stderr


def test_unknown_study_name_lists_known_ones(sweeper_env, tmp_path):
    proc = sweeper("launch", "--study", "cifar100-dept", env=sweeper_env, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "cifar100-depth" in proc.stderr and "Traceback" not in proc.stderr


def test_loading_and_checking_specs_imports_no_torch_optuna_or_mlflow(tmp_path):
    """The contract layer is light: a spec is checked (and refused) without the engine's imports."""
    import subprocess
    import sys
    import textwrap

    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\nvariant=["short4"]\ndataset=["digits"]\n[train]\noptimizer = "adam"')
    code = textwrap.dedent(f"""
        import sys
        from sweeper import spec
        for path in spec.available():
            spec.load(str(path))
        try:
            spec.load({str(bad)!r})
        except spec.SpecError:
            pass
        else:
            sys.exit("the bad spec was accepted")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "optuna", "mlflow", "numpy"))
        print(heavy)
        sys.exit(1 if heavy else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
