"""What a run needs in memory, estimated before anything large is allocated.

A flag a user types must not be able to make varprune eat the machine's memory
(``--model-arg depth=100000``, ``--image-size 4096``): the model is built on
PyTorch's ``meta`` device (shapes, no storage) to count its parameters and to
run one forward pass whose every layer output is measured; with the data held
on the device and the optimizer's state that gives an estimate, compared with
what the device has free. A run that cannot fit is refused with one line that
names the flag to change; an allocation that fails anyway is exit 1 with one
line (errors.exit_code), and a run that never reached its first checkpoint
leaves no folder behind (loop.py).

The estimate is deliberately rough (activations: every module's output kept
for the backward pass, once more for its gradient), meant to catch requests
that are orders of magnitude too large, not to pack memory tightly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from varprune.device import available_memory

# optimizer state per parameter, in parameter-sized tensors: momentum (SGD) or two moments (AdamW); the
# wrappers keep a copy of w (SAM, CrAM) and CrAM+ the first gradient, S2-SAM the previous gradient
_STATES = {"sgd": 1, "adamw": 2}
_WRAPPER = {"sgd": 0, "sam": 1, "asam": 1, "cram": 1, "cram+": 2, "s2sam": 1}
FRACTION = 0.9  # of the device's free memory a run may plan to use
WINDOW_INDEX_BYTES = 8  # a language model's epoch: one int64 start offset per training window (data.tokens)


@dataclass(frozen=True)
class Estimate:
    data: int  # bytes of the data held on the device
    parameters: int  # weights, gradients and optimizer state (this process's shard of them under --fsdp)
    activations: int | None  # one training batch (None: the model could not run on the meta device)
    index: int = 0  # a language model's window index: the start offsets of an epoch's windows, drawn at once
    shards: int = 1  # processes the parameters are sharded over (--fsdp), 1 otherwise

    @property
    def total(self) -> int:
        return self.data + self.parameters + (self.activations or 0) + self.index

    def parts(self) -> dict[str, int]:
        return {
            "data": self.data,
            "parameters": self.parameters,
            "activations": self.activations or 0,
            "window index": self.index,
        }

    def describe(self, device) -> str:
        """``about X on DEVICE (data .., parameters .., activations ..)``, saying what is sharded."""
        detail = ", ".join(f"{k} {gib(v)}" for k, v in self.parts().items() if v)
        sharded = (
            f"; per process: weights, gradients and optimizer state divided by {self.shards} (--fsdp)"
            if self.shards > 1
            else ""
        )
        return f"about {gib(self.total)} on {device} ({detail}{sharded})"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _output_bytes(output) -> int:
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    total = 0
    for o in outputs:
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif hasattr(o, "logits") and isinstance(o.logits, torch.Tensor):
            total += o.logits.numel() * o.logits.element_size()
    return total


def activation_bytes(
    model: nn.Module, example: torch.Tensor | dict, batch_size: int, checkpointed: list[nn.Module] | None = None
) -> int | None:
    """Bytes of one batch's activations: every leaf module's output for ``example`` (one example, on the meta
    device), kept for the backward pass and matched by its gradient, times the batch size.

    ``checkpointed`` (activation checkpointing, ``--grad-checkpoint``): those blocks keep only their output;
    the largest block's inside is counted once (it is recomputed in the backward pass one block at a time)."""
    outside = [0]
    inside = {id(b): 0 for b in checkpointed or ()}
    kept = [0]
    owner: dict[int, int] = {}
    for b in checkpointed or ():
        for m in b.modules():
            owner[id(m)] = id(b)

    def leaf_hook(module, _inputs, output):
        n = _output_bytes(output)
        if id(module) in owner:
            inside[owner[id(module)]] += n
        else:
            outside[0] += n

    def block_hook(_module, _inputs, output):
        kept[0] += _output_bytes(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [m.register_forward_hook(leaf_hook) for m in model.modules() if not list(m.children())]
    handles += [b.register_forward_hook(block_hook) for b in checkpointed or ()]
    try:
        with torch.no_grad():
            model(**example) if isinstance(example, dict) else model(example)
    except Exception:  # a model that cannot run on the meta device: no activation estimate
        return None
    finally:
        for h in handles:
            h.remove()
    return 2 * (outside[0] + kept[0] + max(inside.values(), default=0)) * batch_size


def estimate(
    model_on_meta: nn.Module,
    example,
    batch_size: int,
    optimizer: str,
    method_optimizer: str,
    data_bytes: int,
    windows: int = 0,
    shards: int = 1,
    units: list[nn.Module] | None = None,
    checkpointed: bool = False,
) -> Estimate:
    """The estimate for a model built on the meta device and one meta ``example`` input; ``windows``: a language
    model's training windows an epoch (``--limit-train``), whose start offsets are drawn at once on the device.

    ``shards`` > 1 (``--fsdp``): weights, gradients and optimizer state are divided by it, and the two largest
    ``units`` (the blocks FSDP gathers, one in use and one prefetched) are added whole, in bf16 on a GPU as
    in fp32 here (an upper bound). The batch is the global one, ``batch_size / shards`` per process.
    ``checkpointed`` (``--grad-checkpoint``): ``units`` keep only their outputs (activation_bytes)."""
    n = sum(p.numel() for p in model_on_meta.parameters())
    per = 2 + _STATES.get(optimizer, 2) + _WRAPPER.get(method_optimizer, 1)  # weight, gradient, state, wrapper
    parameters = -(-4 * n * per // shards)
    if shards > 1 and units:
        sizes = sorted((sum(p.numel() for p in u.parameters()) for u in units), reverse=True)
        parameters += 4 * sum(sizes[:2])
    per_process = -(-batch_size // shards)
    activations = activation_bytes(model_on_meta, example, per_process, units if checkpointed else None)
    return Estimate(int(data_bytes), parameters, activations, WINDOW_INDEX_BYTES * int(windows), shards)


def fits_problem(est: Estimate, device: torch.device, flags: dict[str, str]) -> str | None:
    """One line naming the flag to change, or None when the estimate fits in the device's free memory.

    ``flags``: what to suggest for each part (``{"data": "--image-size", "parameters": "--model-arg ...",
    "activations": "--batch-size"}``).
    """
    free = available_memory(device)
    if free <= 0 or est.total <= FRACTION * free:
        return None
    worst = max(est.parts(), key=lambda k: est.parts()[k])
    return f"this run needs {est.describe(device)} but {gib(free)} is free: lower {flags.get(worst, '--batch-size')}"


def block_state_bytes(model: nn.Module, example) -> int:
    """Bytes of one input's hidden state where the calibrated pruners keep it: between two blocks of the model's
    block stack (numerics.calibration.find_block_stack), measured by running ``example`` (one input, on the
    model's device) up to the first block; 0 for a model without a stack (pruned layer by layer, nothing kept)
    or one that cannot run on it."""
    from varprune.errors import MODEL_INPUT_ERRORS, is_out_of_memory
    from varprune.numerics.calibration import find_block_stack
    from varprune.numerics.weights import prunable_weights

    found = find_block_stack(model, [name for name, _ in prunable_weights(model)])
    if found is None:
        return 0
    seen: list[int] = []

    class Reached(Exception):
        pass

    def hook(_module, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        seen.append(x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0)
        raise Reached

    handle = found[1][0].register_forward_pre_hook(hook, with_kwargs=True)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, no BatchNorm statistics updated
    try:
        with torch.no_grad():
            model(**example) if isinstance(example, dict) else model(example)
    except Reached:
        pass
    except MODEL_INPUT_ERRORS as err:  # a model that cannot run on a blank input: the inputs alone are counted
        if is_out_of_memory(err):
            raise
        return 0
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen[0] if seen else 0


def calibration_problem(model: nn.Module, example, example_bytes: int, samples: int, device, flags: str) -> str | None:
    """One line naming ``flags`` when ``samples`` calibration inputs (``example_bytes`` each) and the hidden
    states the pruners keep for them (twice: a block's inputs and outputs) do not fit in the device's free
    memory; None when they do."""
    need = samples * (example_bytes + 2 * block_state_bytes(model, example))
    free = available_memory(device)
    if free <= 0 or need <= FRACTION * free:
        return None
    return (
        f"calibrating on {samples} inputs needs about {gib(need)} on {device} (the inputs and the hidden states "
        f"the pruners keep for each) but {gib(free)} is free: lower {flags}"
    )
