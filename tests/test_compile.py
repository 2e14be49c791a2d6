"""torch.compile: activation and output-gradient statistics computed inside compiled graphs,
compared row by row with the eager recording of the same steps.

With backend="aot_eager" the compiled graph runs the same kernels as eager, so any difference
is the recorder's own: every row must agree to 1e-12. With the default backend (inductor)
the model's own float32 arithmetic differs from eager by rounding (fused kernels), so the
recording of step 0 is compared at 1e-6 relative (a mean against the rms: a mean near zero
has no relative precision of its own), and the later steps' parameter rows loosely.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gradscope as gs
from gradscope.lab.models import build_model

KEY = ["step", "layer", "kind", "stat"]
pytestmark = pytest.mark.timeout(900)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.embed = nn.Linear(784 // 49, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 49, 16))
        return self.head(self.enc(h).mean(1))


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10)),
    "preln": lambda: build_model("preln", 3, width=32),
    "encoder": TinyEncoder,
}


def _train(model: nn.Module, call: nn.Module, every: int = 1, steps: int = 4, **kw):  # type: ignore[no-untyped-def]
    """Records `steps` SGD steps of `call` (model itself, or compiled) on fixed data."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    outputs, grads = [], []
    with gs.watch(call, optimizer=opt, every=every, **kw) as rec:
        for _ in range(steps):
            x, y = torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            out = call(x)
            nn.functional.cross_entropy(out, y).backward()
            outputs.append(out.detach().clone())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
    return rec.to_frame(), outputs, grads


def _joined(eager: pd.DataFrame, compiled: pd.DataFrame) -> pd.DataFrame:
    joined = eager.merge(compiled, on=KEY, how="outer", suffixes=("_e", "_c"), indicator=True)
    missing = joined[joined["_merge"] != "both"]
    assert missing.empty, missing[[*KEY, "_merge"]].head(10).to_string()
    return joined


def _scale(joined: pd.DataFrame) -> pd.Series:
    """What each row's error is measured against: its own size; for a mean, the layer's rms."""
    rms = joined[joined["stat"] == "rms"].set_index(["step", "layer", "kind"])["value_e"]
    scale = joined["value_e"].abs()
    means = joined["stat"] == "mean"
    index = pd.MultiIndex.from_frame(joined.loc[means, ["step", "layer", "kind"]])
    scale[means] = np.maximum(scale[means].to_numpy(), rms.reindex(index).to_numpy())
    return scale.clip(lower=1e-300)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_rows_equal_eager_rows(name):
    """aot_eager: the same kernels as eager, so every recorded row matches to 1e-12."""
    torch.manual_seed(0)
    model = MODELS[name]()
    twin = copy.deepcopy(model)
    eager, eager_out, eager_grads = _train(model, model)
    compiled, out, grads = _train(twin, torch.compile(twin, backend="aot_eager"))
    assert {"activation", "activation_grad"} <= set(compiled["kind"])
    joined = _joined(eager, compiled)
    err = (joined["value_e"] - joined["value_c"]).abs() / _scale(joined)
    worst = joined.loc[err.idxmax(), KEY].tolist()
    assert err.max() < 1e-12, (err.max(), worst)
    if name == "preln":  # the residual stream, block by block
        assert gs.frame.stream_layers(compiled) == gs.frame.stream_layers(eager)
    for a, b in zip(eager_out, out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(eager_grads, grads, strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["mlp", "preln"])
def test_inductor_rows_match_eager_rows(name):
    """The default backend: step 0's recording within 1e-6 of eager's; the model's outputs
    and gradients are those of the same compiled model run without the recorder."""
    torch.manual_seed(0)
    model = MODELS[name]()
    bare, twin = copy.deepcopy(model), copy.deepcopy(model)
    eager, _, _ = _train(model, model, steps=2)
    compiled, out, grads = _train(twin, torch.compile(twin), steps=2)
    joined = _joined(eager, compiled)
    err = (joined["value_e"] - joined["value_c"]).abs() / _scale(joined)
    first = joined["step"] == 0
    assert err[first].max() < 1e-6, joined.loc[err[first].idxmax(), KEY].tolist()
    assert err.max() < 1e-4  # step 1 follows a compiled update: float32 rounding apart
    # without the recorder: the same outputs and gradients, bit for bit
    opt = torch.optim.SGD(bare.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    call = torch.compile(bare)
    for step in range(2):
        x, y = torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        plain = call(x)
        nn.functional.cross_entropy(plain, y).backward()
        torch.testing.assert_close(plain.detach(), out[step], rtol=0, atol=0)
        for p, g in zip(bare.parameters(), grads[step], strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        opt.step()
        opt.zero_grad()


def test_compiled_blocks_record_under_the_eager_names():
    """Each block compiled on its own (torch.compile(block) in the ModuleList): the rows and
    names of the eager model, no `_orig_mod`."""
    torch.manual_seed(0)
    model = build_model("preln", 3, width=32)
    twin = copy.deepcopy(model)
    for i, block in enumerate(twin.blocks):
        twin.blocks[i] = torch.compile(block, backend="aot_eager")
    eager, _, _ = _train(model, model, steps=2)
    compiled, _, _ = _train(twin, twin, steps=2)
    assert not compiled["layer"].str.contains("_orig_mod").any()
    joined = _joined(eager, compiled)
    err = (joined["value_e"] - joined["value_c"]).abs() / _scale(joined)
    assert err.max() < 1e-12


def test_recompiles_are_few_whatever_every_is():
    """Recorded and unrecorded steps run two cached graphs: no compile per recorded step."""
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    bare, twin = copy.deepcopy(model), copy.deepcopy(model)
    counters.clear()
    _train(bare, torch.compile(bare, backend="aot_eager"), steps=9)
    alone = counters["stats"]["unique_graphs"]
    for every in (1, 3):
        counters.clear()
        copied = copy.deepcopy(twin)
        frame, _, _ = _train(
            copied, torch.compile(copied, backend="aot_eager"), every=every, steps=9
        )
        assert sorted(frame["step"].unique()) == list(range(0, 9, every))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs <= alone + (0 if every == 1 else 1), (every, graphs, alone)


@pytest.mark.e2e
def test_subnormal_output_gradients_exact_under_compile():
    """A 60-layer ReLU stack under the default init: first-layer output gradients around
    1e-24 and below are summed in float64 inside the graph, as eager sums them."""
    torch.manual_seed(0)
    model = build_model("plain", 60, width=32)
    twin = copy.deepcopy(model)
    eager, _, _ = _train(model, model, steps=1)
    compiled, _, _ = _train(twin, torch.compile(twin, backend="aot_eager"), steps=1)
    joined = _joined(eager, compiled)
    grads = joined[(joined["kind"] == "activation_grad") & (joined["stat"] == "norm")]
    assert grads["value_e"].min() < 1e-20
    np.testing.assert_allclose(grads["value_c"], grads["value_e"], rtol=1e-12)


def test_watch_after_the_model_already_ran_compiled():
    """A compiled model that has run before watch() is traced again, with the hooks."""
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    call = torch.compile(model, backend="aot_eager")
    call(torch.randn(16, 784)).sum().backward()  # the shape the steps below use
    frame, _, _ = _train(model, call, steps=2)
    acts = gs.frame.select(frame, kind="activation", stat="rms")
    assert sorted(acts["layer"].unique()) == ["0", "1", "2"]
    assert len(acts) == 6


def test_detach_stops_recording_and_a_second_watch_records_again():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    call = torch.compile(model, backend="aot_eager")
    first, _, _ = _train(model, call, steps=2)
    assert not any(m._forward_hooks for m in model.modules())  # every hook removed
    call(torch.randn(16, 784)).sum().backward()  # detached: runs without statistics
    second, _, _ = _train(model, call, steps=2)
    assert len(second) == len(first)
    assert (second["value"].to_numpy() != first["value"].to_numpy()).any()  # trained on
    assert gs.frame.select(second, kind="activation_grad").shape[0] > 0


def test_tuple_outputs_are_labelled_as_in_eager():
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tanh(x), x * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.pair, self.head = nn.Linear(784, 8), Pair(), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.pair(self.fc(x))
            return self.head(a * b)

    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    eager, _, _ = _train(model, model, steps=2)
    compiled, _, _ = _train(twin, torch.compile(twin, backend="aot_eager"), steps=2)
    assert {"pair[0]", "pair[1]"} <= set(compiled["layer"])
    joined = _joined(eager, compiled)
    err = (joined["value_e"] - joined["value_c"]).abs() / _scale(joined)
    assert err.max() < 1e-12


def test_an_unwatched_twin_does_not_lend_its_graph():
    """Models of one architecture share compiled graphs (modules are inlined, not guarded by
    identity): a twin compiled and run first, unwatched, must not run for the watched one."""
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    twin = copy.deepcopy(model)
    watched = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gs.watch(watched, optimizer=opt) as rec:
        for _ in range(2):
            torch.compile(twin, backend="aot_eager")(torch.randn(16, 784)).sum().backward()
            watched(torch.randn(16, 784)).sum().backward()
            opt.step()
    frame = rec.to_frame()
    assert len(gs.frame.select(frame, kind="activation", stat="rms")) == 6
    assert len(gs.frame.select(frame, kind="activation_grad", stat="norm")) == 6


def test_batch_sizes_that_change_are_recorded_with_their_counts():
    """A last short batch (dynamic shapes after the second size): counts follow the batch."""
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    call = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gs.watch(call, optimizer=opt) as rec:
        for batch in (16, 8, 5):
            x = torch.randn(batch, 784)
            with torch.no_grad():
                expected = float(torch.tanh(model[0](x)).double().pow(2).mean().sqrt())
            call(x).sum().backward()
            opt.step()
            opt.zero_grad()
    rms = gs.frame.select(rec.to_frame(), kind="activation", stat="rms", layers=["1"])
    assert len(rms) == 3
    assert rms["value"].iloc[-1] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_nonfinite_outputs_counted_and_located_as_in_eager(backend):
    """An output holding inf and NaN: the same counts, extremes (NaN ignored) and origin."""

    class Blowup(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = torch.ones_like(x)
            scale[:, 0] = math.inf  # inf, and NaN where x is 0
            return x * scale

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(784, 8), nn.ReLU(), Blowup(), nn.Linear(8, 10))

    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    eager, _, _ = _train(model, model, steps=1)
    compiled, _, _ = _train(twin, torch.compile(twin, backend=backend), steps=1)
    joined = _joined(eager, compiled)
    acts = joined[joined["kind"].isin(["activation", "nonfinite_origin"])]
    assert (acts["value_e"].isna() == acts["value_c"].isna()).all()
    both = acts.dropna(subset=["value_e"])
    np.testing.assert_allclose(both["value_c"], both["value_e"], rtol=1e-6)
    nonfinite = gs.frame.select(compiled, kind="activation", stat="nonfinite", layers=["2"])
    assert nonfinite["value"].iloc[0] == 16  # a whole column of the batch
    assert set(gs.frame.select(compiled, kind="nonfinite_origin")["layer"]) >= {"2"}


@pytest.mark.parametrize("skipped", [False, True])
def test_grad_scaler_under_compile_unscales_each_backward_by_its_own_scale(skipped):
    """With a GradScaler each backward's output-gradient rows are kept apart (a hook on the
    probes) and divided by the scale of the forward they belong to; a skipped step merges."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    hidden = model[1](model[0](x))
    hidden.retain_grad()
    model[2](hidden).pow(2).sum().backward()
    ref = hidden.grad.double()
    model.zero_grad(set_to_none=True)
    call = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same forward every time
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gs.watch(call, optimizer=opt, grad_scaler=scaler) as rec:
        for skip in [True, False] if skipped else [False]:
            scaler.scale(call(x).pow(2).sum()).backward()
            if skip:  # an overflow: no optimizer step, the next step halves the scale
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    frame = rec.to_frame()
    assert frame["step"].unique().tolist() == [0]
    passes = 2 if skipped else 1
    norm = gs.frame.select(frame, kind="activation_grad", stat="norm", layers=["1"])
    assert norm["value"].iloc[0] == pytest.approx(math.sqrt(passes) * float(ref.norm()), rel=1e-7)
    sample = gs.frame.select(frame, kind="activation_grad", stat="sample_norm", layers=["1"])
    assert sample["value"].iloc[0] == pytest.approx(float(ref.norm(dim=1).mean()), rel=1e-7)


def test_calls_of_one_module_merge_as_in_eager():
    """A cell applied three times per forward and two micro-batches per step: under compile
    the calls add up in the module's rows, as the eager path merges them."""

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.cell, self.head = (
                nn.Linear(784, 16),
                nn.Linear(16, 16),
                nn.Linear(16, 10),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for _ in range(3):
                h = torch.tanh(self.cell(h))
            return self.head(h)

    def run(model: nn.Module, call: nn.Module) -> pd.DataFrame:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        with gs.watch(call, optimizer=opt) as rec:
            for _ in range(2):
                for _ in range(2):  # micro-batches
                    x = torch.randn(8, 784, generator=gen)
                    (call(x).pow(2).mean() / 2).backward()
                opt.step()
                opt.zero_grad()
        return rec.to_frame()

    torch.manual_seed(0)
    model = Loop()
    twin = copy.deepcopy(model)
    eager = run(model, model)
    compiled = run(twin, torch.compile(twin, backend="aot_eager"))
    joined = _joined(eager, compiled)
    err = (joined["value_e"] - joined["value_c"]).abs() / _scale(joined)
    assert err.max() < 1e-12, joined.loc[err.idxmax(), KEY].tolist()
