"""Run by test_precision.py in its own process: 2-process DDP (gloo, CPU) with QLoRAPrecision."""

import os
import sys

import lightning as L
import torch
import transformers

from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig


class ConfigureModelLM(L.LightningModule):
    """An HF model built in ``configure_model``, the way Lightning builds large models."""

    def __init__(self, path):
        super().__init__()
        self.path, self.model = path, None

    def configure_model(self):
        if self.model is None:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(self.path)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


if __name__ == "__main__":
    torch.manual_seed(0)
    data = torch.randint(0, 96, (16, 24))
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype="float32", blocksize=32), lora=LoRAConfig(r=4))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[plugin],
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = ConfigureModelLM(sys.argv[1])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    adapters = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".lora_B." in n])
    # One write per line: both ranks share the pipe, and print() writes text and newline apart.
    sys.stdout.flush()
    os.write(1, f"RANK {trainer.global_rank} {adapters.abs().sum().item():.6f}\n".encode())
