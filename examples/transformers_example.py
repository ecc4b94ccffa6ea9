"""Hugging Face Transformers + flightlog: a tiny BERT (built from a config, nothing downloaded).

Synthetic token sequences with a planted rule (label 1 when token 7 occurs), so it
runs offline on a CPU in seconds.

    python examples/transformers_example.py         # record
    flightlog show latest
    flightlog resume latest -- python examples/transformers_example.py   # continue a killed run

Hindsight logging: add ``fl.log(...)`` in a ``TrainerCallback`` hook (``on_step_end``, ``on_log``)
or a ``compute_loss`` override, then

    flightlog replay examples/transformers_example.py --run latest --workers 2   # batch level

Several processes (gloo on CPU): one run, a ``rank`` on every row; resume and replay work the same way:

    torchrun --standalone --nproc_per_node=2 examples/transformers_example.py

Environment: KILL_AT_EPOCH=N kills the process (SIGKILL) when epoch N begins, after
the previous epoch's checkpoint is durable; OUT_DIR sets the Trainer's output folder;
SAVE_STRATEGY=epoch makes the Trainer save its own checkpoint at each epoch end
(flightlog then records references to those folders instead of its own copies).
"""
import os
import signal
import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import flightlog as fl
from flightlog.integrations.transformers import FlightlogCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(8, 100, (n, 16), generator=g)
        plant = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(0, 16, (n,), generator=g)
        self.x[plant, pos[plant]] = 7
        self.y = plant.long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": self.y[i]}


class KillAt(TrainerCallback):
    """Test aid: SIGKILL when an epoch begins, once flightlog's checkpoints are on disk."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_begin(self, args, state, control, **kw):
        if int(round(state.epoch or 0)) == self.epoch:
            r = fl._run.ACTIVE
            ck = r.checkpointer
            if ck is not None:
                ck._q.join()
            r.rec.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def main(epochs: int = 3):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    args = TrainingArguments(output_dir=os.environ.get("OUT_DIR") or tempfile.mkdtemp(), num_train_epochs=epochs,
                             per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=3e-3,
                             logging_strategy="steps", logging_steps=2, eval_strategy="epoch",
                             save_strategy=os.environ.get("SAVE_STRATEGY", "no"),
                             report_to=[], seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    every = int(os.environ["CKPT_EVERY"]) if os.environ.get("CKPT_EVERY") else None  # default: adaptive
    callbacks = [FlightlogCallback(every=every)]
    if os.environ.get("KILL_AT_EPOCH"):
        callbacks.append(KillAt(int(os.environ["KILL_AT_EPOCH"])))
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(128, 1), eval_dataset=Tokens(64, 2),
                      callbacks=callbacks)
    trainer.train()
    out = os.environ.get("WEIGHTS_OUT")
    if out:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
