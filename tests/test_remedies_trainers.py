"""Remedies in Lightning and the transformers Trainer: applied where they fit, a clear
CannotApply where they do not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradscope.remedies import CannotApply


def test_lightning_callback_scales_the_learning_rate_and_its_schedule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    L = pytest.importorskip("lightning.pytorch")
    from gradscope.integrations.remedies import lightning_callback

    seen: list[float] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, idx):  # type: ignore[no-untyped-def]
            seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            opt = torch.optim.SGD(self.parameters(), lr=0.5)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[lightning_callback("lr_x0.1")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Module(), loader)
    # epoch 0 at 0.05 (0.5 x 0.1), epoch 1 halved by the scheduler from its scaled base
    assert seen == pytest.approx([0.05] * 4 + [0.025] * 4)


def test_lightning_says_what_to_use_for_clipping() -> None:
    pytest.importorskip("lightning.pytorch")
    from gradscope.integrations.remedies import lightning_callback

    with pytest.raises(CannotApply, match="gradient_clip_val=1"):
        lightning_callback("clip_1.0")
    with pytest.raises(CannotApply, match="zeroes gradients itself"):
        lightning_callback("zero_grad")


def test_training_arguments_carry_the_remedy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from gradscope.integrations.remedies import training_arguments

    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3,
                                          max_grad_norm=0.0, report_to=[])  # fmt: skip
    assert training_arguments(args, "lr_x0.3").learning_rate == pytest.approx(3e-4)
    assert training_arguments(args, "clip_1.0").max_grad_norm == 1.0
    assert training_arguments(args, "warmup").warmup_steps == 40
    assert args.learning_rate == 1e-3 and args.max_grad_norm == 0.0  # the user's untouched
    with pytest.raises(CannotApply, match="already"):
        training_arguments(args, "sgd_to_adamw")
    with pytest.raises(CannotApply, match="no learning rate is zero"):
        training_arguments(args, "remove_zero_lr")
    with pytest.raises(CannotApply, match="zeroes gradients itself"):
        training_arguments(args, "zero_grad")
    with pytest.raises(CannotApply, match="before Trainer"):
        training_arguments(args, "reinit_matched")


def test_lightning_callback_replaces_plain_sgd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    L = pytest.importorskip("lightning.pytorch")
    from gradscope.integrations.remedies import lightning_callback

    kinds: list[str] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, idx):  # type: ignore[no-untyped-def]
            kinds.append(type(self.trainer.optimizers[0]).__name__)
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.5)

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    module = Module()
    before = module.net.weight.detach().clone()
    trainer = L.Trainer(
        max_epochs=1, callbacks=[lightning_callback("sgd_to_adamw")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert kinds == ["AdamW", "AdamW"]
    # AdamW's first steps move each weight by about its learning rate (1e-3), SGD's at 0.5 more
    moved = (module.net.weight.detach() - before).abs().max()
    assert 1e-4 < float(moved) < 3e-3
