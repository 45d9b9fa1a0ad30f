"""VarCallback in the real Hugging Face Trainer and the real Lightning Trainer, against a plain loop that adds
the autograd penalty ``reg()`` to its loss: the same weights, and a control that shows the comparison can fail."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import contextlib
import copy
import importlib
import json
import logging
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from varprune.models import create_model
from varprune.numerics.regularizers import VarRegularizer

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")
from transformers.trainer_callback import ExportableState  # noqa: E402

from varprune.integrations import grad_scale  # noqa: E402
from varprune.integrations.hf import VarCallback as HFVarCallback  # noqa: E402
from varprune.integrations.lightning import VarCallback as PLVarCallback  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
]

LR, STRENGTH, STEPS, BATCH = 0.1, 1.0, 3, 4
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return create_model(
        "gpt2", vocab_size=100, max_positions=16, n_layer=2, n_embd=32, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return torch.randint(0, 100, (BATCH * STEPS, 16), generator=torch.Generator().manual_seed(1))


def plain_loop(base, data, reg: bool, steps=STEPS, lam=None):
    """SGD on ``loss + reg()`` (the autograd penalty), the batches in order; the reference."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    var = VarRegularizer(model, lam) if lam is not None else VarRegularizer.from_strength(model, STRENGTH)
    for s in range(steps):
        x = data[s * BATCH : (s + 1) * BATCH]
        loss = model(input_ids=x, labels=x).loss + (var() if reg else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ Hugging Face Trainer


class Tokens(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def hf_trainer(model, data, tmp_path, callbacks=(), accumulation=1, steps=STEPS, **args):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    settings = dict(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=steps, max_grad_norm=0.0,  # no clipping
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(args)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**settings),
        train_dataset=Tokens(data),
        optimizers=(opt, constant),
        callbacks=list(callbacks),
    )


def test_hf_trainer_matches_the_plain_loop(base, data, tmp_path):
    callback = HFVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    trainer = hf_trainer(model, data, tmp_path, [callback])
    trainer.train()
    reference = plain_loop(base, data, reg=True)
    assert_same(model, reference)
    # the control: the same Trainer without the callback is the plain loop without VAR, far from the reference
    control = copy.deepcopy(base)
    hf_trainer(control, data, tmp_path).train()
    assert_same(control, plain_loop(base, data, reg=False))
    assert max_diff(control, reference) > 1e-3
    # VAR's term is logged; at the first step lam * psi(w_start) is the strength
    terms = [entry["var_term"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(terms) == STEPS and terms[0] == pytest.approx(STRENGTH, rel=1e-5) and terms[-1] < terms[0]


def test_hf_gradient_accumulation(base, data, tmp_path):
    model = copy.deepcopy(base)
    hf_trainer(model, data, tmp_path, [HFVarCallback(strength=STRENGTH)], accumulation=2).train()
    assert_same(model, plain_loop(base, data, reg=True))


def test_hf_lam_and_the_moment_strength_is_resolved(base, data, tmp_path):
    model = copy.deepcopy(base)
    callback = HFVarCallback(strength=0.5)
    trainer = hf_trainer(model, data, tmp_path, [callback], steps=1)
    with torch.no_grad():  # after the Trainer is built, before training starts
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    at_start = copy.deepcopy(model)
    trainer.train()
    assert callback.reg.lam == VarRegularizer.from_strength(at_start, 0.5).lam
    assert callback.reg.lam != VarRegularizer.from_strength(base, 0.5).lam
    assert callback.reg.weights[0] is model.transformer.h[0].attn.c_attn.weight  # the model's own weights

    fixed = HFVarCallback(lam=1e-5)
    model = copy.deepcopy(base)
    hf_trainer(model, data, tmp_path, [fixed], steps=2).train()
    assert fixed.reg.lam == 1e-5
    assert_same(model, plain_loop(base, data, reg=True, steps=2, lam=1e-5))


def test_hf_resume_keeps_the_lambda_of_the_start(base, data, tmp_path):
    first = HFVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    hf_trainer(model, data, tmp_path, [first], steps=2, save_strategy="steps", save_steps=2).train()
    resumed = HFVarCallback(strength=STRENGTH)
    again = copy.deepcopy(base)
    trainer = hf_trainer(again, data, tmp_path, [resumed], steps=STEPS)
    trainer.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))
    assert resumed.reg.lam == first.resolved_lam
    assert resumed.reg.lam != VarRegularizer.from_strength(model, STRENGTH).lam  # not resolved on trained weights
    assert_same(again, plain_loop(base, data, reg=True))


class VarianceLogger(transformers.TrainerCallback, ExportableState):
    """Another library's stateful callback that happens to share VarCallback's class name."""

    def state(self):
        return {"args": {}, "attributes": {"seen": 1}}


VarianceLogger.__name__ = VarianceLogger.__qualname__ = "VarCallback"


@pytest.mark.parametrize("restore_states", [False, True])
def test_hf_resume_finds_its_own_lambda_among_states_of_that_name(base, data, tmp_path, restore_states):
    """The checkpoint lists every state saved under the class name "VarCallback" (at the start, lambda not
    yet known, then at each save): the resumed callback takes the newest one saved with its arguments."""
    first = HFVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    hf_trainer(model, data, tmp_path, [first, VarianceLogger()], steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["VarCallback"]
    assert len(saved) == 4 and saved[0]["attributes"]["resolved_lam"] is None  # the case: the first has none
    resumed = HFVarCallback(strength=STRENGTH)
    again = copy.deepcopy(base)
    trainer = hf_trainer(
        again, data, tmp_path, [resumed, VarianceLogger()], restore_callback_states_from_checkpoint=restore_states
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    ours = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, HFVarCallback)]
    assert len(ours) == 1 and ours[0].reg.lam == first.resolved_lam
    assert_same(again, plain_loop(base, data, reg=True))


def test_hf_resume_with_other_arguments_resolves_anew(base, data, tmp_path):
    first = HFVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    hf_trainer(model, data, tmp_path, [first], steps=2, save_strategy="steps", save_steps=2).train()
    other = HFVarCallback(strength=2 * STRENGTH)
    trainer = hf_trainer(copy.deepcopy(base), data, tmp_path, [other])
    with pytest.warns(UserWarning, match="no lambda of a VarCallback with these arguments"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))
    assert other.reg.lam == VarRegularizer.from_strength(model, 2 * STRENGTH).lam  # on the resumed weights


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "give exactly one of strength="),
        (dict(strength=1.0, lam=1e-6), "give exactly one of strength="),
        (dict(strength=-1.0), "strength must be a finite number >= 0"),
        (dict(lam=float("inf")), "lam must be a finite number >= 0"),
        (dict(strength=True), "strength must be a finite number >= 0"),
    ],
)
@pytest.mark.parametrize("callback", [HFVarCallback, PLVarCallback])
def test_arguments_are_checked(callback, kwargs, message):
    with pytest.raises(ValueError, match=message):
        callback(**kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(eps=float("inf")), "eps"),  # every term 1 / (V + eps) exactly 0: training without VAR
        (dict(eps=float("nan")), "eps"),
        (dict(eps=0.0), "eps"),
        (dict(eps="1e-8"), "eps"),
        (dict(r=-1e-8), "r"),
        (dict(r=float("nan")), "r"),
        (dict(r=float("inf")), "r"),
        (dict(exclude="lm_head.weight"), "exclude"),  # a string would be read as one pattern per character
        (dict(exclude=[3]), "exclude"),
        (dict(exclude=3), "exclude"),
    ],
)
@pytest.mark.parametrize("callback", [HFVarCallback, PLVarCallback])
def test_constants_are_checked_on_construction(callback, kwargs, name):
    with pytest.raises(ValueError, match=rf"^VarCallback: (VAR's )?{name} must be"):
        callback(strength=1.0, **kwargs)


def test_lightning_log_term_is_a_bool():
    with pytest.raises(ValueError, match="log_term must be True or False"):
        PLVarCallback(strength=1.0, log_term="no")  # a truthy string would log anyway
    assert PLVarCallback(1.0, log_term=False).log_term is False  # strength is the first argument, as for HF


def test_hf_refuses_a_second_var_callback(base, data, tmp_path):
    # two callbacks (even of different arguments) would each add VAR's gradient: refused at Trainer(...)
    with pytest.raises(ValueError, match="more than one VarCallback"):
        hf_trainer(copy.deepcopy(base), data, tmp_path, [HFVarCallback(strength=1.0), HFVarCallback(lam=1e-6)])
    one = HFVarCallback(strength=1.0)
    with pytest.raises(ValueError, match="more than one VarCallback"):  # the same one listed twice
        hf_trainer(copy.deepcopy(base), data, tmp_path, [one, one])
    # one added after Trainer(...): refused when training starts, before any step
    model = copy.deepcopy(base)
    trainer = hf_trainer(model, data, tmp_path, [HFVarCallback(strength=1.0)])
    trainer.add_callback(HFVarCallback(strength=2.0))
    with pytest.raises(ValueError, match="more than one VarCallback"):
        trainer.train()
    assert_same(model, base)
    assert trainer.state.global_step == 0


def test_lightning_refuses_a_second_var_callback(base, data):
    class Mine(PLVarCallback):  # another class: Lightning's own check of duplicate state keys lets it pass
        pass

    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="more than one VarCallback"):
        pl_fit(model, data, [PLVarCallback(strength=1.0), Mine(lam=1e-6)])
    assert_same(model, base)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `VarCallback`"):
        pl_fit(model, data, [PLVarCallback(strength=1.0), PLVarCallback(lam=1e-6)])  # refused by Lightning


@pytest.mark.parametrize(
    "args,env,message",
    [
        (dict(deepspeed="ds_config.json"), {}, "cannot run under DeepSpeed"),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "cannot run under DeepSpeed"),
        (dict(fsdp="full_shard", fsdp_config={"version": 1}), {}, "cannot run under FSDP1"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, "cannot run under FSDP1"),  # accelerate's default version
        ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "cannot run under FSDP1"),
    ],
)
def test_hf_refuses_deepspeed_and_fsdp1_naming_fsdp2(base, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    callback = HFVarCallback(strength=1.0)
    settings = types.SimpleNamespace(**{"deepspeed": None, "fsdp": None, "fsdp_config": None, **args})
    state = transformers.TrainerState()
    with pytest.raises(ValueError, match=message) as e:
        callback.on_train_begin(settings, state, transformers.TrainerControl(), model=base)
    assert "FSDP2" in str(e.value) and "\n" not in str(e.value)
    assert callback.reg is None


@pytest.mark.parametrize(
    "args,env",
    [
        (dict(fsdp="full_shard", fsdp_config={"version": 2}), {}),
        ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
    ],
)
def test_hf_accepts_fsdp2(base, monkeypatch, args, env):
    """FSDP2 is not refused (accelerate enables FSDP on accelerators only: the real run is in
    benchmarks/gpu_check.sh; the numerics on DTensor shards are tests/test_shards.py's)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    callback = HFVarCallback(strength=1.0)
    settings = types.SimpleNamespace(**{"deepspeed": None, "fsdp": None, "fsdp_config": None, **args})
    callback.on_train_begin(settings, transformers.TrainerState(), transformers.TrainerControl(), model=base)
    assert callback.reg is not None


@pytest.mark.parametrize("callback", [HFVarCallback, PLVarCallback])
def test_frozen_weights_are_left_out(base, callback):
    model = copy.deepcopy(base)
    model.transformer.h[0].requires_grad_(False)
    var = callback(strength=1.0)
    var._resolve(model)
    names = [name for name, _ in var.reg.named]
    assert names and not any(name.startswith("transformer.h.0.") for name in names)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable prunable weights"):
        var._resolve(model)


def _scaled_grads(model, data, scaler):
    x = data[:BATCH]
    model.zero_grad()
    scaler.scale(model(input_ids=x, labels=x).loss).backward()


@pytest.mark.parametrize("unscaled_first", [False, True])
def test_hf_fp16_gradients_in_the_scaler_units(base, data, unscaled_first):
    """The gradients at on_pre_optimizer_step are unscaled in transformers 5 (clip_grad_norm_ unscales);
    if they were not, VAR's must be added times the scale: both cases, with a real GradScaler."""
    model = copy.deepcopy(base)
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerated = types.SimpleNamespace(optimizer=inner, scaler=scaler)  # what AcceleratedOptimizer holds
    callback = HFVarCallback(strength=STRENGTH)
    callback.on_train_begin(types.SimpleNamespace(), transformers.TrainerState(), None, model=model)
    _scaled_grads(model, data, scaler)
    if unscaled_first:
        scaler.unscale_(inner)
    callback.on_pre_optimizer_step(None, None, None, optimizer=accelerated)
    if not unscaled_first:
        scaler.unscale_(inner)
    reference = copy.deepcopy(base)
    var = VarRegularizer.from_strength(reference, STRENGTH)
    x = data[:BATCH]
    (reference(input_ids=x, labels=x).loss + var()).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_grad_scale_reads_the_scaler_state():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    assert grad_scale(None, opt, w.device) is None
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(w.sum()).backward()
    assert grad_scale(scaler, opt, w.device).item() == 8.0
    scaler.unscale_(opt)
    assert grad_scale(scaler, opt, w.device) is None
    assert grad_scale(torch.amp.GradScaler("cpu", enabled=False), opt, w.device) is None


# ------------------------------------------------------------------ Lightning


class LM(pl.LightningModule):
    def __init__(self, model, fused=False):
        super().__init__()
        self.model, self.fused = model, fused

    def training_step(self, batch, index):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, fused=self.fused or None)


def pl_fit(model, data, callbacks=(), accumulation=1, steps=STEPS, ckpt_path=None, fused=False, plugins=None):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulation,
        callbacks=list(callbacks), plugins=plugins, gradient_clip_val=None,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(data), batch_size=BATCH // accumulation, shuffle=False)
    trainer.fit(LM(model, fused), loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_matches_the_plain_loop(base, data):
    callback = PLVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    trainer = pl_fit(model, data, [callback])
    reference = plain_loop(base, data, reg=True)
    assert_same(model, reference)
    control = copy.deepcopy(base)
    pl_fit(control, data)
    assert_same(control, plain_loop(base, data, reg=False))
    assert max_diff(control, reference) > 1e-3
    assert callback.reg.weights[0] is model.transformer.h[0].attn.c_attn.weight
    assert trainer.callback_metrics["var_term"].item() < STRENGTH


def test_lightning_gradient_accumulation(base, data):
    model = copy.deepcopy(base)
    pl_fit(model, data, [PLVarCallback(strength=STRENGTH)], accumulation=2)
    assert_same(model, plain_loop(base, data, reg=True))


class ScalerWithoutAutocast(pl.plugins.precision.MixedPrecision):
    """fp16 AMP's GradScaler on the CPU, computing in float32: power-of-two scales keep the arithmetic exact."""

    def __init__(self):
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))

    def forward_context(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("fused", [False, True])
def test_lightning_amp_scaler(base, data, fused):
    """Lightning unscales before on_before_optimizer_step, except for optimizers that unscale in step()
    (fused SGD): there VAR's gradient must carry the scale."""
    model = copy.deepcopy(base)
    pl_fit(model, data, [PLVarCallback(strength=STRENGTH)], fused=fused, plugins=[ScalerWithoutAutocast()])
    assert_same(model, plain_loop(base, data, reg=True))


def test_lightning_resume_keeps_the_lambda_of_the_start(base, data, tmp_path):
    first = PLVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    trainer = pl_fit(model, data, [first], steps=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = PLVarCallback(strength=STRENGTH)
    again = copy.deepcopy(base)
    pl_fit(again, data, [resumed], steps=STEPS, ckpt_path=tmp_path / "two.ckpt")
    assert resumed.reg.lam == first.resolved_lam
    assert resumed.reg.lam != VarRegularizer.from_strength(model, STRENGTH).lam


def test_lightning_resume_takes_only_the_lambda_of_its_arguments(base, data, tmp_path):
    first = PLVarCallback(strength=STRENGTH)
    model = copy.deepcopy(base)
    trainer = pl_fit(model, data, [first], steps=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    other = PLVarCallback(strength=2 * STRENGTH)
    with pytest.warns(UserWarning, match="belongs to a VarCallback with other arguments"):
        pl_fit(copy.deepcopy(base), data, [other], steps=STEPS, ckpt_path=tmp_path / "two.ckpt")
    assert other.reg.lam == VarRegularizer.from_strength(model, 2 * STRENGTH).lam  # on the resumed weights
    # a checkpoint of varprune 0.3 (its state has no arguments) keeps its lambda, as it did
    checkpoint = torch.load(tmp_path / "two.ckpt", weights_only=False)
    del checkpoint["callbacks"]["VarCallback"]["args"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = PLVarCallback(strength=STRENGTH)
    pl_fit(copy.deepcopy(base), data, [resumed], steps=STEPS, ckpt_path=tmp_path / "old.ckpt")
    assert resumed.reg.lam == first.resolved_lam


@pytest.mark.parametrize("strategy", ["DeepSpeedStrategy", "XLAFSDPStrategy"])
def test_lightning_refuses_sharding_strategies(strategy):
    trainer = types.SimpleNamespace(strategy=type(strategy, (), {})())
    with pytest.raises(ValueError, match=f"cannot run under {strategy}"):
        PLVarCallback(strength=1.0).setup(trainer, None, "fit")


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_lightning_judges_fsdp_strategies_by_their_parameters(strategy):
    """Not refused by name: FSDP2's DTensor parameters work (the torchrun test below), FSDP1's flat ones do not."""
    trainer = types.SimpleNamespace(strategy=type(strategy, (), {})())
    PLVarCallback(strength=1.0).setup(trainer, None, "fit")


@pytest.mark.slow
def test_lightning_fsdp2_matches_the_plain_loop(base, data, tmp_path):
    """ModelParallelStrategy with fully_shard (FSDP2) on 2 gloo processes, each its half of every batch:
    the weights of one process's plain loop with the autograd penalty, and far from the loop without it."""
    from pathlib import Path

    from test_distributed import torchrun

    out = tmp_path / "state.pt"
    probe = Path(__file__).with_name("fsdp_lightning_probe.py")
    r = torchrun([str(out), str(STEPS), str(BATCH), str(LR), str(STRENGTH)], script=probe)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = torch.load(out)
    reference = plain_loop(base, data, reg=True)
    assert got["lam"] == VarRegularizer.from_strength(base, STRENGTH).lam
    for name, t in reference.state_dict().items():
        torch.testing.assert_close(got["state"][name], t, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    control = plain_loop(base, data, reg=False).state_dict()
    assert max((got["state"][k] - v).abs().max().item() for k, v in control.items()) > 1e-3


def test_lightning_refuses_two_optimizers(base, data):
    class Two(LM):
        def __init__(self, model):
            super().__init__(model)
            self.automatic_optimization = False

        def training_step(self, batch, index):
            return None

        def configure_optimizers(self):
            half = len(list(self.parameters())) // 2
            params = list(self.parameters())
            return [torch.optim.SGD(params[:half], lr=LR), torch.optim.SGD(params[half:], lr=LR)]

    trainer = pl.Trainer(
        max_steps=1, max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,  # ends if not refused
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PLVarCallback(lam=1e-6)],
    )  # fmt: skip
    with pytest.raises(ValueError, match="supports one optimizer, not 2"):
        trainer.fit(Two(copy.deepcopy(base)), DataLoader(TensorDataset(data), batch_size=BATCH))


# ------------------------------------------------------------------ optional dependencies


@pytest.mark.parametrize(
    "module,missing,hint",
    [
        ("varprune.integrations.hf", ["transformers"], "pip install 'varprune[hf]'"),
        ("varprune.integrations.lightning", ["lightning", "lightning.pytorch"], "pip install 'varprune[lightning]'"),
    ],
)
def test_a_missing_trainer_says_what_to_install(monkeypatch, module, missing, hint):
    monkeypatch.delitem(sys.modules, module)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=hint.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)
