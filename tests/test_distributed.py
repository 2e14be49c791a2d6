"""DDP, FSDP2, the sweep over ranks (real gloo process groups), AMP, accumulation, compile."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.lab.models import build_model

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _torchrun(args, cwd=REPO, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _compare(single: pd.DataFrame, other: pd.DataFrame) -> None:
    key = ["layer", "kind", "stat"]
    joined = single.merge(
        other, on=key, suffixes=("_single", "_other"), how="outer", indicator=True
    )
    assert (joined["_merge"] == "both").all(), joined[joined["_merge"] != "both"]
    a, b = joined["value_single"].to_numpy(), joined["value_other"].to_numpy()
    # means of normalized outputs are ~0: compare those on the scale of their std
    atol = np.where(joined["stat"] == "mean", 1e-7, 0.0)
    ok = np.isclose(b, a, rtol=1e-6, atol=atol) | (np.isnan(a) & np.isnan(b))
    assert ok.all(), joined[~ok]


def test_ddp_and_fsdp_equal_single_process_on_the_global_batch(tmp_path):
    _torchrun([str(REPO / "tests" / "dist_check.py"), str(tmp_path)])
    single = pd.read_parquet(tmp_path / "single.parquet")
    assert {"param_grad", "update", "activation", "activation_grad"} <= set(single["kind"])
    for name in ("ddp", "fsdp"):
        _compare(single, pd.read_parquet(tmp_path / f"{name}.parquet"))


@pytest.mark.e2e
def test_sweep_over_ranks_equals_single_process(tmp_path):
    args = [
        "--depths",
        "2,4",
        "--variants",
        "plain,preln",
        "--steps",
        "10",
        "--every",
        "5",
        "--dataset",
        "synthetic",
    ]
    _torchrun(["-m", "gradscope", "depth-sweep", *args, "--out", str(tmp_path / "ranks")])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gradscope",
            "depth-sweep",
            *args,
            "--workers",
            "1",
            "--out",
            str(tmp_path / "one"),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    key = ["variant", "depth", "seed", "step", "layer", "kind", "stat"]
    frames = [
        pd.read_parquet(tmp_path / d / "frame.parquet").sort_values(key).reset_index(drop=True)
        for d in ("ranks", "one")
    ]
    pd.testing.assert_frame_equal(*frames)
    runs = [
        pd.read_csv(tmp_path / d / "runs.csv").drop(columns="seconds") for d in ("ranks", "one")
    ]
    pd.testing.assert_frame_equal(*runs)
    assert (tmp_path / "ranks" / "report.html").is_file()


def _grad_norms(frame, step=0):
    rows = frame[(frame.kind == "param_grad") & (frame.stat == "norm") & (frame.step == step)]
    return rows.set_index("layer")["value"]


def test_amp_records_unscaled_gradients():
    torch.manual_seed(0)
    base = build_model("plain", 3, width=16)
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    ref = build_model("plain", 3, width=16)
    ref.load_state_dict(base.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(ref(x), y).backward()
    out = {}
    ref.blocks[1].fc.register_full_backward_hook(
        lambda m, gi, go: out.__setitem__("g", go[0].clone())
    )
    opt = torch.optim.SGD(base.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with gs.watch(base, optimizer=opt, grad_scaler=scaler) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(base(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    frame = rec.to_frame()
    got = _grad_norms(frame)
    for name, p in ref.named_parameters():
        assert got[name] == pytest.approx(float(p.grad.double().norm()), rel=1e-6)
    # output gradients are unscaled too: compare with an unscaled reference backward
    ref.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(ref(x), y).backward()
    act = frame[
        (frame.kind == "activation_grad") & (frame.layer == "blocks.1.fc") & (frame.stat == "norm")
    ]
    # the scale is a power of two: unscaling is exact, whatever the bfloat16 rounding
    assert float(act.value.iloc[0]) == pytest.approx(float(out["g"].double().norm()), rel=1e-6)
    sample = frame[
        (frame.kind == "activation_grad")
        & (frame.layer == "blocks.1.fc")
        & (frame.stat == "sample_norm")
    ]
    ref_sample = float(out["g"].double().norm(dim=1).mean())
    assert float(sample.value.iloc[0]) == pytest.approx(ref_sample, rel=1e-6)
    # bfloat16 outputs are measured too
    assert "blocks.1.fc" in set(frame[frame.kind == "activation"].layer)


def test_gradient_accumulation_describes_the_accumulated_gradient():
    torch.manual_seed(0)
    model = build_model("preln", 2, width=16)
    twin = build_model("preln", 2, width=16)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(twin(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.watch(model, optimizer=opt) as rec:
        for part in (slice(0, 4), slice(4, 8)):
            (nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
        opt.step()
    got = _grad_norms(rec.to_frame())
    for name, p in twin.named_parameters():
        assert got[name] == pytest.approx(float(p.grad.double().norm()), rel=1e-5)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_compiled_model_parameter_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    with gs.watch(compiled, optimizer=opt, activations=False, activation_grads=False) as rec:
        opt.zero_grad()
        compiled(torch.randn(5, 8)).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    frame = rec.to_frame()
    assert set(frame.kind) == {"param_grad", "param", "update"}
    got = _grad_norms(frame)
    for name, g in grads.items():
        assert got[name] == pytest.approx(float(g.double().norm()), rel=1e-6)
