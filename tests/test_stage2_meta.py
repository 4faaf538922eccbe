"""Stage-2 models loaded for inference (``rae sample``'s model and AutoGuidance guide, a MeanFlow teacher) are built
on the meta device and materialised by the load: the same weights and outputs as a random init then a copying
load, with no random initialisation on the way."""

from __future__ import annotations

import pytest
import torch

from dit_training_helpers import synthetic_cache
from rae_cli.config import resolve
from rae_cli.schema import DiTConfig

SHAPE = (32, 4, 4)


def _same_model(new: torch.nn.Module, old: torch.nn.Module) -> None:
    assert not any(t.is_meta for t in [*new.parameters(), *new.buffers()])
    assert all(p.dtype == torch.float32 for p in new.parameters())
    sd_old, sd_new = old.state_dict(), new.state_dict()
    assert sd_old.keys() == sd_new.keys()
    for k in sd_old:
        torch.testing.assert_close(sd_new[k], sd_old[k], rtol=0, atol=0, msg=k)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, *SHAPE, generator=g), torch.rand(2, generator=g), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(new(x, t, y), old(x, t, y), rtol=0, atol=0)


def test_sample_model_and_guide_are_built_on_meta_and_materialised_by_the_load(tmp_path, init_spy):
    from rae_cli.build import build_dit_model
    from rae_cli.stage2_loading import build_stage2

    dit = resolve(DiTConfig, preset="tiny")
    torch.manual_seed(3)
    old = build_dit_model(dit, SHAPE, 4).eval()  # the former path: random init, then a copying load
    torch.save({"ema": old.state_dict()}, tmp_path / "stage2_model.pt")  # an official training checkpoint
    assert not all(init_spy)  # the spy sees a real init
    init_spy.clear()
    for what in ("stage-2 model", "guide model"):
        new = build_stage2(str(tmp_path / "stage2_model.pt"), dit, what=what)
        assert init_spy and all(init_spy), f"the {what} ran a real random init"
        assert new.latent_shape == SHAPE and new.num_classes == 4
        _same_model(new.model, old)
        assert not any(p.requires_grad for p in new.model.parameters())
        init_spy.clear()
    with pytest.raises(Exception, match="wrong shape"):  # a mismatch is still a clear error, meta or not
        build_stage2(str(tmp_path / "stage2_model.pt"), dit, latent_shape=(16, 4, 4), num_classes=4)


def test_a_meanflow_teacher_is_built_on_meta_and_materialised_by_the_load(tmp_path, monkeypatch):
    from rae_cli.build import build_dit_model
    from rae_cli.checkpoint import strict_load
    from rae_cli.meanflow import load_teacher
    from rae_cli.run_dir import resolve_checkpoint
    from rae_cli.train_dit import TrainDiTConfig, train_dit

    cache = synthetic_cache(tmp_path / "cache", classes=2)
    run = tmp_path / "run"
    train_dit(cfg=resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", "max_steps=1"]), out_dir=run)
    ck = resolve_checkpoint(run)
    cfg = resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}"])
    old = build_dit_model(cfg.dit, SHAPE, 2)
    strict_load(old, ck.weights("ema"))
    inits = []
    real = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: (inits.append(self.weight.is_meta), real(self))[1])
    teacher = load_teacher(str(run), torch.device("cpu"), SHAPE, 2)
    assert inits and all(inits), "the teacher ran a real random init"
    _same_model(teacher, old.eval())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
