"""fit() and what it stands on: learning, reproducibility, resume, stops, recipe, batch loader,
precision, engine imports, checkpoints and the synthetic data set.

Everything trains short4 on tiny data on the CPU; the few full trainings are module-scoped
fixtures shared by several tests. torch runs on one thread here: on a small machine shared with
other test runs, two OpenMP threads per process oversubscribe the cores and a 10 s training
takes minutes (spinning threads wait on each other).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from sweeper import checkpoint, precision
from sweeper.checkpoint import CheckpointError
from sweeper.data import BatchLoader, load, synthetic
from sweeper.data.base import DatasetInfo, Splits
from sweeper.data.loader import normalize
from sweeper.models import build_model
from sweeper.train import (
    EpochMetrics,
    Interrupted,
    NonFiniteLoss,
    Recipe,
    cpu_copy,
    fit,
    make_optimizer,
    resolve_precision,
    seed_everything,
)

TIMING_FIELDS = {"epoch_seconds", "images_per_s"}
METRIC_FIELDS = [f.name for f in dataclasses.fields(EpochMetrics) if f.name not in TIMING_FIELDS]

# The synthetic reference run (resume, learnability): small enough for seconds, with enough steps
# (12 per epoch) for BatchNorm's running statistics to settle.
SYN_TRAIN, SYN_TEST, SYN_BATCH, SYN_EPOCHS = 96, 32, 8, 3


def metrics(history: list[EpochMetrics]) -> list[dict]:
    return [{k: getattr(m, k) for k in METRIC_FIELDS} for m in history]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "history":  # a training state's history: equal but for the timings
            assert [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in a[key]] == [
                {k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in b[key]
            ]
        elif isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


HAS_FAST_BF16 = bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


# --- shared trainings ----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_run():
    data = load("digits")
    seed_everything(1)
    model = build_model("short4", data.num_classes, data.in_channels)
    return fit(model, data, Recipe(epochs=3), device="cpu")  # precision auto


@pytest.fixture(scope="module")
def synthetic_data() -> Splits:
    return synthetic.load(SYN_TRAIN, SYN_TEST)


@pytest.fixture(scope="module")
def synthetic_runs(synthetic_data, tmp_path_factory):
    """A: 3 epochs unbroken, writing a checkpoint to disk after epoch 1.
    B: a fresh start (new model, other seed) resumed from that checkpoint for epochs 2 and 3."""
    recipe = Recipe(epochs=SYN_EPOCHS, batch_size=SYN_BATCH, eval_batch_size=SYN_TEST, seed=7)
    path = tmp_path_factory.mktemp("resume") / "short4.pt"
    states: dict[str, dict[int, dict]] = {"a": {}, "b": {}}

    def keep(run: str):
        def on_epoch(m, state) -> None:
            states[run][m.epoch] = copy.deepcopy(state())  # on the CPU, state() shares the live tensors
            if run == "a" and m.epoch == 1:
                checkpoint.save(path, {**state(), "variant": "short4", "dataset": "synthetic"})

        return on_epoch

    seed_everything(recipe.seed)
    model_a = build_model("short4", synthetic_data.num_classes)
    run_a = fit(model_a, synthetic_data, recipe, device="cpu", on_epoch=keep("a"))

    seed_everything(12345)  # other initial weights: everything must come from the checkpoint
    model_b = build_model("short4", synthetic_data.num_classes)
    resume = checkpoint.load(path, expect={"variant": "short4"})
    run_b = fit(model_b, synthetic_data, recipe, device="cpu", resume=resume, on_epoch=keep("b"))
    return dict(a=run_a, b=run_b, states=states, resume=resume, path=path)


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_short4_learns_digits_in_three_epochs(digits_run):
    history = digits_run.history
    assert [m.epoch for m in history] == [1, 2, 3]
    assert digits_run.final.top1_error < 0.1
    assert 0 <= digits_run.final.top5_error <= digits_run.final.top1_error
    assert history[-1].train_loss < history[0].train_loss
    assert [m.lr for m in history] == pytest.approx([1.0, 0.7, 0.49])  # StepLR gamma 0.7 per epoch
    assert all(m.images_per_s > 0 and m.epoch_seconds > 0 for m in history)
    assert digits_run.train_seconds == pytest.approx(sum(m.epoch_seconds for m in history))


@pytest.mark.slow
def test_synthetic_is_learnable_well_below_chance(synthetic_runs):
    run = synthetic_runs["a"]
    chance = 1 - 1 / synthetic.DEFAULT_CLASSES
    assert run.final.top1_error < chance / 2, [m.top1_error for m in run.history]
    assert run.final.train_loss < run.history[0].train_loss


# --- reproducibility and resume --------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_device_and_precision_give_identical_metrics():
    info = dataclasses.replace(load("digits").info, hflip=True)  # flips on: their coins must repeat too
    data = dataclasses.replace(tiny_digits(128, 64), info=info)
    recipe = Recipe(epochs=2, batch_size=32, seed=3)
    runs, finals = [], []
    for _ in range(2):
        seed_everything(recipe.seed)
        model = build_model("short4", data.num_classes, data.in_channels)
        states: list[dict] = []
        runs.append(
            fit(model, data, recipe, device="cpu", on_epoch=lambda m, state: states.append(copy.deepcopy(state())))
        )
        finals.append(states[-1])
    assert (runs[0].device, runs[0].precision) == (runs[1].device, runs[1].precision)
    assert metrics(runs[0].history) == metrics(runs[1].history)
    # Not only the metrics: weights, optimizer state and random streams are identical.
    assert_same_tensors(finals[0], finals[1])


@pytest.mark.slow
def test_resume_after_epoch_one_matches_an_unbroken_run(synthetic_runs):
    a, b, states = synthetic_runs["a"], synthetic_runs["b"], synthetic_runs["states"]
    assert synthetic_runs["resume"]["epoch"] == 1
    assert [m.epoch for m in b.history] == [1, 2, 3]  # epoch 1 from the checkpoint
    assert sorted(states["b"]) == [2, 3]  # only the remaining epochs were trained
    assert metrics(b.history) == metrics(a.history)
    for part in ("model", "optimizer", "scheduler", "rng"):  # the final states too, bit for bit
        assert_same_tensors(states["a"][3][part], states["b"][3][part])


@pytest.mark.slow
def test_checkpoint_holds_the_full_state_and_loads_without_pickled_code(synthetic_runs):
    state = synthetic_runs["resume"]
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "recipe", "history", "format_version"} <= set(state)
    assert state["recipe"]["seed"] == 7 and state["variant"] == "short4"
    # checkpoint.load uses weights_only=True; the same file must load that way directly too.
    torch.load(synthetic_runs["path"], weights_only=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_adamw_and_sgd_step_fused_on_the_cpu_and_resume_exactly(optimizer):
    """torch's fused kernel (one pass per tensor), kept across a checkpoint: a run resumed after
    epoch 1 ends with exactly the metrics and weights of the unbroken run."""
    data = tiny_digits()
    recipe = Recipe(epochs=2, batch_size=32, optimizer=optimizer, lr=0.002 if optimizer == "adamw" else 0.05, seed=4)
    assert make_optimizer(build_model("short4", 10, 1), recipe).defaults["fused"] is True
    states: dict[str, dict[int, dict]] = {"unbroken": {}, "resumed": {}}

    def keep(run: str):
        return lambda m, state: states[run].__setitem__(m.epoch, copy.deepcopy(state()))

    seed_everything(recipe.seed)
    unbroken = fit(
        build_model("short4", 10, 1), data, recipe, device="cpu", precision="fp32", on_epoch=keep("unbroken")
    )
    seed_everything(99)  # other initial weights: everything comes from the checkpoint
    resume = states["unbroken"][1]
    resumed = fit(
        build_model("short4", 10, 1),
        data,
        recipe,
        device="cpu",
        precision="fp32",
        resume=resume,
        on_epoch=keep("resumed"),
    )
    assert metrics(resumed.history) == metrics(unbroken.history)
    for part in ("model", "optimizer"):
        assert_same_tensors(states["unbroken"][2][part], states["resumed"][2][part])
    assert states["resumed"][2]["optimizer"]["param_groups"][0]["fused"] is True


# --- stopping --------------------------------------------------------------------------------


def tiny_digits(train: int = 128, test: int = 64) -> Splits:
    return load("digits").limit(train, test)


def test_absurd_learning_rate_raises_non_finite_loss_naming_epoch_and_step():
    data = tiny_digits()
    seed_everything(0)
    model = build_model("short4", data.num_classes, data.in_channels)
    recipe = Recipe(epochs=2, batch_size=32, optimizer="sgd", lr=1e30, momentum=0.0)
    with pytest.raises(NonFiniteLoss) as info:
        fit(model, data, recipe, device="cpu", precision="fp32")
    err = info.value
    assert err.epoch == 1 and 2 <= err.step <= 4  # step 1 is computed before the first update
    assert f"epoch 1, step {err.step}" in str(err)
    assert "learning rate" in str(err)


@pytest.mark.slow
def test_model_that_outputs_nan_stops_at_the_exact_step():
    data = tiny_digits()  # 128 images / 32 per batch = 4 steps per epoch
    seed_everything(0)
    model = build_model("short4", data.num_classes, data.in_channels)
    calls = {"train": 0}

    def poison(module, inputs, output):
        if module.training:
            calls["train"] += 1
            if calls["train"] >= 7:  # epoch 2, step 3
                return output * float("nan")
        return output

    model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLoss) as info:
        fit(model, data, Recipe(epochs=3, batch_size=32), device="cpu")
    assert (info.value.epoch, info.value.step) == (2, 3)
    assert "epoch 2, step 3" in str(info.value)


@pytest.mark.slow
def test_should_stop_raises_interrupted_with_the_last_finished_epoch():
    data = tiny_digits()
    seed_everything(0)
    model = build_model("short4", data.num_classes, data.in_channels)
    asked, finished = [], []

    def should_stop():
        asked.append(1)
        return len(asked) == 6  # epoch 2, before step 2

    with pytest.raises(Interrupted) as info:
        fit(
            model,
            data,
            Recipe(epochs=3, batch_size=32),
            device="cpu",
            should_stop=should_stop,
            on_epoch=lambda m, state: finished.append(m.epoch),
        )
    assert info.value.last_epoch == 1
    assert finished == [1]
    assert "after epoch 1" in str(info.value)

    with pytest.raises(Interrupted) as info:
        fit(model, data, Recipe(epochs=3, batch_size=32), device="cpu", should_stop=lambda: True)
    assert info.value.last_epoch == 0


# --- recipe ----------------------------------------------------------------------------------


def test_recipe_defaults_are_the_seed_recipe_and_round_trip():
    recipe = Recipe()
    assert (recipe.epochs, recipe.batch_size, recipe.optimizer, recipe.lr, recipe.lr_gamma) == (
        14,
        64,
        "adadelta",
        1.0,
        0.7,
    )
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict({"lr": 1, "limit_train": None}).lr == 1.0  # an int is a fine float


def test_recipe_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError) as info:
        Recipe.from_dict({"epochz": 3})
    message = str(info.value)
    assert message.startswith("epochz: unknown recipe key; allowed: epochs, batch_size"), message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "3", "must be an integer >= 1, got '3'"),
        ("epochs", 2.5, "must be an integer >= 1, got 2.5"),
        ("epochs", True, "must be an integer >= 1, got True"),
        ("lr", "fast", "must be a number > 0, got 'fast'"),
        ("lr", True, "must be a number > 0, got True"),
        ("lr", float("inf"), "must be a finite number, got inf"),
        ("nesterov", 1, "must be true or false, got 1"),
        ("optimizer", 3, "unknown value 3; one of: adadelta, sgd, adamw"),
        ("optimizer", "rmsprop", "unknown value 'rmsprop'; one of: adadelta, sgd, adamw"),
        ("epochs", 0, "must be an integer >= 1, got 0"),
        ("lr", 0.0, "must be a number > 0, got 0.0"),
        ("limit_train", 1.5, "must be an integer >= 1, got 1.5"),
        ("limit_train", 0, "must be an integer >= 1, got 0"),
        ("limit_test", -500, "must be an integer >= 1, got -500"),
        ("weight_decay", -0.1, "must be a number >= 0, got -0.1"),
    ],
)
def test_recipe_from_dict_rejects_wrong_types_and_values(key, value, message):
    with pytest.raises(ValueError) as info:
        Recipe.from_dict({key: value})
    assert str(info.value) == f"{key}: {message}"


def test_every_recipe_key_has_a_validation_rule():
    from dataclasses import fields

    from sweeper.contract import RECIPE_RULES

    assert [f.name for f in fields(Recipe)] == list(RECIPE_RULES)


# --- batch loader ----------------------------------------------------------------------------


def indexed_images(n: int, channels: int = 3, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is left-right asymmetric and its top-left pixel is i, so any batch can be traced."""
    x = torch.zeros(n, channels, size, size, dtype=torch.uint8)
    x[:, :, :, -1] = 255  # a bright right column: a flip moves it to the left
    x[:, :, 0, 0] = torch.arange(n, dtype=torch.uint8)[:, None]
    return x, torch.arange(n)


def test_normalisation_maps_0_to_minus_1_and_255_to_1():
    out = normalize(torch.tensor([0, 255, 51], dtype=torch.uint8))
    assert out.dtype == torch.float32
    assert out[0].item() == -1.0 and out[1].item() == 1.0
    assert out[2].item() == pytest.approx(-0.6)


def test_permutation_covers_every_image_exactly_once_per_epoch():
    x, y = indexed_images(70)
    loader = BatchLoader(x, y, 16, shuffle=True, hflip=False, generator=torch.Generator().manual_seed(3))
    assert len(loader) == 5
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert [len(yb) for _, yb in batches] == [16, 16, 16, 16, 6]
        seen = torch.cat([yb for _, yb in batches])
        assert sorted(seen.tolist()) == list(range(70))
        for xb, yb in batches:  # images stay with their labels
            assert torch.equal(xb[:, 0, 0, 0], normalize(yb.to(torch.uint8)))
        orders.append(seen.tolist())
    assert orders[0] != orders[1] and orders[0] != list(range(70))  # a new permutation each epoch
    again = BatchLoader(x, y, 16, shuffle=True, hflip=False, generator=torch.Generator().manual_seed(3))
    assert torch.cat([yb for _, yb in again]).tolist() == orders[0]  # seeded: reproducible


def test_unshuffled_unflipped_batches_are_the_normalised_images_in_order():
    x, y = indexed_images(10)
    batches = list(BatchLoader(x, y, 4, shuffle=False, hflip=False))
    assert torch.equal(torch.cat([xb for xb, _ in batches]), normalize(x))
    assert torch.equal(torch.cat([yb for _, yb in batches]), y)


def test_flips_are_whole_images_and_about_half():
    x, y = indexed_images(200)
    x = x.clone()
    x[:, :, 0, 0] = 7  # index lives in the label only; pixel 0,0 must not vary
    flipped = 0
    for xb, yb in BatchLoader(x, y, 64, shuffle=True, hflip=True, generator=torch.Generator().manual_seed(0)):
        plain, mirrored = normalize(x[yb]), normalize(x[yb]).flip(3)
        is_plain = (xb == plain).flatten(1).all(1)
        is_mirrored = (xb == mirrored).flatten(1).all(1)
        assert bool((is_plain ^ is_mirrored).all())
        flipped += int(is_mirrored.sum())
    assert 60 < flipped < 140


def test_channels_last_when_asked():
    x, y = indexed_images(8)
    xb, _ = next(iter(BatchLoader(x, y, 8, shuffle=False, hflip=True, channels_last=True, generator=torch.Generator())))
    assert xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()
    xb, _ = next(iter(BatchLoader(x, y, 8, shuffle=False, hflip=True, generator=torch.Generator())))
    assert xb.is_contiguous()


class Recorder(nn.Module):
    """A tiny classifier that keeps every input it sees, with the mode it was in."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, x.detach().clone()))
        return self.linear(x.float().mean((2, 3)))


def asymmetric_splits(hflip: bool) -> Splits:
    x, y = indexed_images(64)
    y = y % 10
    info = DatasetInfo("asym", 10, (3, 4, 4), hflip=hflip, description="test")
    return Splits(info, x, y, x.clone(), y.clone())


@pytest.mark.parametrize("hflip", [True, False])
def test_fit_flips_only_training_images_and_only_where_the_dataset_allows(hflip):
    data = asymmetric_splits(hflip)
    model = Recorder(3, 10)
    fit(model, data, Recipe(epochs=2, batch_size=16, eval_batch_size=32), device="cpu", precision="fp32")
    train = torch.cat([x for training, x in model.seen if training])
    test = torch.cat([x for training, x in model.seen if not training])
    right_bright = train[:, 0, 1, -1] == 1.0  # row 1 (row 0 holds the index): unflipped images
    assert len(train) == 2 * 64
    if hflip:
        assert 0 < int((~right_bright).sum()) < len(train)
    else:
        assert bool(right_bright.all())
    # The test split is never augmented: exactly the normalised images, in order, every epoch.
    assert torch.equal(test, torch.cat([normalize(data.test_x)] * 2))


@pytest.mark.slow
def test_precision_auto_measures_the_modes_and_caches_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.5,) * 3)  # cached whoever shares the machine
    cpu = torch.device("cpu")
    # Every candidate timed, fp32 layouts included (auto itself probes only where precisions differ).
    chosen = precision.choose(build_model("short4", 10, 1), (1, 8, 8), 2, cpu, modes=precision.candidates(cpu))
    (cache,) = tmp_path.glob("precision-torch*.json")
    (entry,) = json.loads(cache.read_text()).values()
    timings = entry["seconds_per_step"]
    precisions = ("fp32", "bf16") if HAS_FAST_BF16 else ("fp32",)
    assert set(timings) == {f"{p}/{f}" for p in precisions for f in ("contiguous", "channels_last")}
    assert timings[chosen.label] == min(timings.values())
    assert (chosen.precision, chosen.channels_last) == (entry["precision"], entry["channels_last"])

    # From now on the cache decides (no probe), in fit() too: an entry edited by hand is obeyed.
    entry.update(precision="fp32", channels_last=not entry["channels_last"])
    cache.write_text(json.dumps({next(iter(json.loads(cache.read_text()))): entry}))
    data = load("digits").limit(16, 16)
    again = fit(build_model("short4", 10, 1), data, Recipe(epochs=1, batch_size=2), device="cpu")
    assert (again.precision, again.channels_last) == ("fp32", entry["channels_last"])


def test_a_probe_on_an_overloaded_cpu_picks_the_mode_but_is_not_cached(tmp_path, monkeypatch):
    """The load average is the one thing faked: making this 2-core machine run at load 10 would
    slow the whole suite."""
    cores = os.cpu_count() or 1
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (cores * (precision.OVERLOAD + 3),) * 3)
    cpu = torch.device("cpu")
    modes = precision.candidates(cpu)
    mode = precision.choose(build_model("short4", 10, 1), (1, 8, 8), 2, cpu, cache=tmp_path / "cache.json", modes=modes)
    assert mode in modes
    assert not (tmp_path / "cache.json").exists()

    monkeypatch.setattr(precision.os, "getloadavg", lambda: (cores * precision.OVERLOAD * 0.5,) * 3)
    precision.choose(build_model("short4", 10, 1), (1, 8, 8), 2, cpu, cache=tmp_path / "cache.json", modes=modes)
    (entry,) = json.loads((tmp_path / "cache.json").read_text()).values()
    assert entry["load_per_core"] == precision.OVERLOAD * 0.5


@pytest.mark.parametrize("fast_bf16", [False, True], ids=["fp32-only CPU", "bf16 CPU"])
def test_auto_probes_neither_short_cells_nor_fp32_layouts(tmp_path, monkeypatch, fast_bf16):
    """No probe on a cell's critical path where it cannot pay: a quickstart cell (4 epochs x 16
    steps) on any CPU, and any trial on a CPU without fast bf16, where the candidates are two fp32
    layouts (the rule: channels_last). The CPU's bf16 flag is the one thing faked."""
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    probes = []
    real_probe = precision.probe
    monkeypatch.setattr(precision, "probe", lambda *a, **k: probes.append(a[1]) or real_probe(*a, **k))
    cpu = torch.device("cpu")
    cache = tmp_path / "cache.json"
    quickstart_cell = 4 * 16
    for shape in ((1, 8, 8), (3, 32, 32)):
        mode = precision.choose(build_model("short4", 10, shape[0]), shape, 32, cpu, cache, total_steps=quickstart_cell)
        assert mode == precision.rule(cpu)
    assert probes == [] and not cache.exists()
    if not fast_bf16:  # a seed-recipe cell (14 epochs x 782 steps): the rule still
        for shape in ((1, 8, 8), (3, 32, 32)):
            mode = precision.choose(build_model("short4", 10, shape[0]), shape, 64, cpu, cache, total_steps=14 * 782)
            assert mode == precision.Mode("fp32", True)
        assert probes == [] and not cache.exists()


def stepped_modes(monkeypatch, cold_extra_s: float = 0.0) -> list[str]:
    """The modes of each probe step, in order (the real step runs); ``cold_extra_s`` is added to each
    mode's first step, as cold kernels cost on a contended CPU: the one thing faked."""
    seen: list[str] = []
    real_step = precision.Stepper.step

    def step(self) -> float:
        cold = self.mode.label not in seen
        seen.append(self.mode.label)
        if cold and cold_extra_s:
            time.sleep(cold_extra_s)
        return real_step(self) + (cold_extra_s if cold else 0.0)

    monkeypatch.setattr(precision.Stepper, "step", step)
    return seen


def test_a_probe_stops_before_its_next_step_would_pass_its_share_of_the_trial(monkeypatch):
    """A trial of 12 steps allows the probe 1.2 steps' time: the rule's mode steps cold and warm (its
    warm step sets the budget), and no other mode's cold step starts."""
    cpu = torch.device("cpu")
    modes = precision.candidates(cpu)  # two fp32 layouts at least, on any CPU
    seen = stepped_modes(monkeypatch)
    with pytest.raises(precision.OverBudget, match="precision probe stopped"):
        precision.probe(build_model("short4", 10, 1), (1, 8, 8), 2, cpu, modes, total_steps=12)
    assert seen == [precision.rule(cpu).label] * 2
    # Without a trial to answer to (the benchmarks' tables), every mode is timed.
    seen.clear()
    timings = precision.probe(build_model("short4", 10, 1), (1, 8, 8), 2, cpu, modes)
    assert set(timings) == set(modes) and max(timings.values()) < float("inf")
    assert seen[:2] == [precision.rule(cpu).label] * 2


def test_auto_trains_in_the_rule_when_cold_steps_would_cost_more_than_the_trial_repays(tmp_path, monkeypatch):
    """Enough steps for the step-count rule (PAYBACK x the probe's steps), but every mode's first
    step takes 2 s more, as cold kernels can on a contended CPU: the probe stops after the rule's
    mode, the trial trains in the rule's mode, and nothing is cached."""
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.5,) * 3)
    cpu = torch.device("cpu")
    modes = precision.candidates(cpu)
    seen = stepped_modes(monkeypatch, cold_extra_s=2.0)
    cache = tmp_path / "cache.json"
    total_steps = precision.PAYBACK * precision.probe_steps(modes)
    mode = precision.choose(build_model("short4", 10, 1), (1, 8, 8), 2, cpu, cache, total_steps, modes)
    assert mode == precision.rule(cpu)
    assert set(seen) == {mode.label} and not cache.exists()  # no other mode's 2 s was paid


@pytest.mark.slow
def test_precision_auto_skips_a_probe_longer_than_the_trial_can_repay(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path))
    data = load("digits").limit(64, 32)
    result = fit(build_model("short4", 10, 1), data, Recipe(epochs=2, batch_size=16), device="cpu")  # 8 steps
    rule = precision.rule(torch.device("cpu"))
    assert (result.precision, result.channels_last) == (rule.precision, rule.channels_last)
    assert not list(tmp_path.glob("precision-torch*.json"))  # a probe would have cached its answer
    assert result.setup_seconds < result.train_seconds


@pytest.mark.skipif(not HAS_FAST_BF16, reason="this CPU has neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo")
def test_bf16_trains_channels_last_on_this_cpu():
    model = Recorder(3, 10)
    result = fit(model, asymmetric_splits(True), Recipe(epochs=1, batch_size=16), device="cpu", precision="bf16")
    assert (result.precision, result.channels_last) == ("bf16", True)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for _, x in model.seen)


def test_fp32_is_selectable():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    model = Recorder(3, 10)
    result = fit(model, asymmetric_splits(True), Recipe(epochs=1, batch_size=16), device="cpu", precision="fp32")
    assert result.precision == "fp32"
    assert all(x.is_contiguous() for _, x in model.seen)
    with pytest.raises(ValueError, match="choose one of: auto, fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.slow
def test_partial_last_batch_never_recompiles_and_trains_like_eager(monkeypatch):
    """37 images at batch 16: 16, 16 and a last batch of 5, two epochs. Compiled, the 5 would be a
    new shape: a recompile (and new CUDA graphs) every epoch. Counted with a backend that counts."""
    from torch._dynamo.testing import CompileCounter

    data = load("digits").limit(2 * 16 + 5, 16)
    recipe = Recipe(epochs=2, batch_size=16, eval_batch_size=16)
    seed_everything(1)
    eager = fit(build_model("short4", 10, 1), data, recipe, device="cpu", precision="fp32")

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend=counter))
    torch._dynamo.reset()
    frames_after_first_step = []
    seed_everything(1)
    compiled = fit(
        build_model("short4", 10, 1),
        data,
        recipe,
        device="cpu",
        precision="fp32",
        compile=True,
        on_step=lambda step, total: frames_after_first_step.append(counter.frame_count) if step == 1 else None,
    )
    torch._dynamo.reset()
    assert frames_after_first_step[0] >= 1, "the full batches ran through the compiled model"
    assert counter.frame_count == frames_after_first_step[0], "the partial batch recompiled"
    for c, e in zip(metrics(compiled.history), metrics(eager.history), strict=True):
        assert {k for k, v in c.items() if v is None} == {k for k, v in e.items() if v is None}  # no val split
        measured = {k: v for k, v in c.items() if v is not None}
        expected = {k: v for k, v in e.items() if v is not None}
        assert measured == pytest.approx(expected, rel=1e-4), "every image trained, the last batch weighted by its size"


@pytest.mark.parametrize("capability, auto", [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_bf16_only_on_gpus_with_compute_capability_8(monkeypatch, capability, auto):
    """No GPU here: the capability query is faked. A T4 (7.5) would emulate bf16, slower than fp32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    gpu = torch.device("cuda:1")
    assert resolve_precision("auto", gpu) == auto
    if auto == "fp32":
        with pytest.raises(ValueError, match=r"cuda:1 \(Fake GPU, compute capability 7.5\).*--precision auto or fp32"):
            resolve_precision("bf16", gpu)
    else:
        assert resolve_precision("bf16", gpu) == "bf16"


def test_cpu_copy_shares_nothing_with_the_live_state():
    model = build_model("short4", 10, 1)
    optimizer = torch.optim.Adadelta(model.parameters())
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    live = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    copied = cpu_copy(live)
    before = copy.deepcopy(copied)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()  # mutates the live tensors in place
    assert_same_tensors(copied["model"], before["model"])
    assert_same_tensors(copied["optimizer"]["state"][0], before["optimizer"]["state"][0])
    assert not torch.equal(copied["model"]["linear.weight"], model.state_dict()["linear.weight"])
    assert copied["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]


# --- layering --------------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_modules_import_neither_optuna_nor_mlflow():
    code = textwrap.dedent("""
        import sys
        import sweeper.models, sweeper.data, sweeper.train, sweeper.checkpoint
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("optuna", "mlflow"))
        print(heavy)
        sys.exit(1 if heavy else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- checkpoints -----------------------------------------------------------------------------


def small_state(size: int = 10) -> dict:
    return {"model": {"w": torch.arange(size, dtype=torch.float32)}, "epoch": 1, "variant": "short4"}


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    checkpoint.save(path, small_state())
    checkpoint.save(path, {**small_state(20), "epoch": 2})  # replaces the first
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    state = checkpoint.load(path)
    assert state["epoch"] == 2 and state["format_version"] == checkpoint.FORMAT_VERSION
    assert torch.equal(state["model"]["w"], torch.arange(20, dtype=torch.float32))


def test_truncated_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, small_state(1000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(path) in str(info.value)
    assert "delete it" in str(info.value)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a sweeper checkpoint"):
        checkpoint.load(foreign)


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt.pt", small_state())
    assert checkpoint.load(path, expect={"variant": "short4"})["variant"] == "short4"
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, expect={"variant": "standard"})
    message = str(info.value)
    assert str(path) in message and "'short4'" in message and "'standard'" in message


def test_newer_format_version_is_refused_with_an_upgrade_hint(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({**small_state(), "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert str(path) in message and "newer" in message and "upgrade" in message


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "64k"):
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs to fill the disk needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"sweeper-test-{uuid.uuid4().hex[:8]}", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    with tiny_tmpfs(tmp_path / "disk") as disk:
        path = disk / "ckpt.pt"
        checkpoint.save(path, small_state())  # a few KB: fits
        with pytest.raises(CheckpointError) as info:
            checkpoint.save(path, {**small_state(100_000), "epoch": 2})  # 400 KB: does not
        assert str(path) in str(info.value) and "previous checkpoint is kept" in str(info.value)
        assert [p.name for p in disk.iterdir()] == ["ckpt.pt"]  # the temp file was removed
        state = checkpoint.load(path)
        assert state["epoch"] == 1 and torch.equal(state["model"]["w"], small_state()["model"]["w"])


# --- synthetic data --------------------------------------------------------------------------


def test_synthetic_data_is_deterministic_from_its_seed():
    a, b, other = synthetic.load(64, 16, seed=0), synthetic.load(64, 16, seed=0), synthetic.load(64, 16, seed=1)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.train_x, other.train_x)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (64, 3, 32, 32)
    assert a.train_y.dtype == torch.int64 and set(a.train_y.tolist()) <= set(range(10))
    assert len(set(a.train_y.tolist())) > 5  # many classes, not one
    assert a.info.hflip and a.info.name == "synthetic"
