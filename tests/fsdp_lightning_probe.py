"""Lightning's ModelParallelStrategy with FSDP2 (``fully_shard`` in ``configure_model``) and VarCallback, for
launching under torchrun on the CPU (test_integrations.py). Writes the whole trained state to ``argv[1]`` (rank 0),
for comparison with one process's plain loop.

``argv``: OUT SEED STEPS BATCH LR STRENGTH; the model and data are built as the test builds them.
"""

import logging
import os
import sys
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from varprune.models import create_model

warnings.filterwarnings("ignore")


def main() -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from varprune.integrations.lightning import VarCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out, steps, batch, lr, strength = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    world = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = create_model(
        "gpt2", vocab_size=100, max_positions=16, n_layer=2, n_embd=32, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    data = torch.randint(0, 100, (batch * steps, 16), generator=torch.Generator().manual_seed(1))

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch_, index):
            (x,) = batch_
            return self.model(input_ids=x, labels=x).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    callback = VarCallback(strength=float(strength))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=world, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], use_distributed_sampler=False,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
    )  # fmt: skip
    # each process its contiguous share of every global batch (the plain loop's batches, in order)
    share, rank = batch // world, int(os.environ["RANK"])
    mine = [s * batch + rank * share + j for s in range(steps) for j in range(share)]
    loader = DataLoader(TensorDataset(data[mine]), batch_size=share, shuffle=False)
    module = LM()
    trainer.fit(module, loader)
    assert type(module.model.transformer.h[0].attn.c_attn.weight).__name__ == "DTensor"
    from varprune.engine.sharding import full_state

    state = full_state(module.model.state_dict())
    if trainer.global_rank == 0:
        torch.save({"state": state, "lam": callback.reg.lam}, out)
    # Lightning leaves the process group up after fit; a process that exits with gloo's worker threads alive can
    # abort in interpreter finalization ("terminate called without an active exception", seen under load), so
    # both processes wait for each other and leave the group, as a script of the user's own should
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
