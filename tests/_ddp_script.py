"""Train the toy classifier on two CPU processes; run by ``test_trainer.py``.

Usage: ``python _ddp_script.py OUT_DIR {ddp,ddp_spawn}``. With ``ddp`` Fabric re-runs this script
for rank 1 and every rank writes ``rank{r}.json``; with ``ddp_spawn`` the work runs in spawned
processes and the main process writes ``rank0.json`` from rank 0's returned results.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scdlkit.training import Trainer


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.labels = (np.arange(n) % 3).astype(np.int64)
        self.x = (4.0 * np.eye(3, 8)[self.labels] + rng.normal(size=(n, 8))).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"x": self.x[i], "labels": int(self.labels[i])}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, batch):
        latent = self.encoder(batch["x"])
        return {"logits": self.head(latent), "latent": latent}


def main(out_dir: Path, strategy: str) -> None:
    torch.manual_seed(0)
    train, val = ToyData(250, seed=0), ToyData(150, seed=1)  # 5 val batches: uneven over ranks
    trainer = Trainer(
        MLP(),
        batch_size=32,
        epochs=8,
        lr=1e-2,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision="fp32",  # the ranks' predictions are compared with a direct forward pass
        progress=False,
    )
    trainer.fit(train, val)
    metrics = trainer.evaluate(val)
    predicted = trainer.predict(val)
    with torch.inference_mode():
        direct = trainer.model.cpu()({"x": torch.from_numpy(val.x)})["logits"].numpy()
    digest = hashlib.sha256()
    for key, value in sorted(trainer.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    rank = trainer.fabric.global_rank
    result = {
        "world_size": trainer.fabric.world_size,
        "accuracy": metrics["accuracy"],
        "n_cells": len(val),
        "n_predicted": int(predicted["logits"].shape[0]),
        "predictions_in_order": bool(np.allclose(predicted["logits"], direct, atol=1e-5)),
        "weights_digest": digest.hexdigest(),
        "epochs_run": len(trainer.history_),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
