"""TRL's training metrics read from the GPU once per log line instead of every micro-batch.

TRL's compute_loss reads the entropy, the token accuracy and the token count back to the host after each
micro-batch (`.item()`). Each read waits for every kernel queued so far, so the GPU idles while the host queues
the next step. The subclass below computes the same loss and the same metrics, keeps the metrics as GPU tensors,
and hands them to TRL's log() in one read. Any other loss (evaluation, label smoothing, DFT, a mixture-of-experts
aux loss, a custom loss, sequence parallelism) is TRL's own. It repeats TRL's code, so tests/test_lazy_metrics.py
trains with both and compares loss, logged metrics and weights: a TRL upgrade that changes either fails there.
"""

from __future__ import annotations

from typing import Any


def trainer_class() -> type:
    """TRL's SFTTrainer with the metrics kept on the GPU until a log line (made here: TRL imports slowly)."""
    import torch
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pending: list = []  # one [entropy, accuracy] GPU tensor per micro-batch since the last log
            self._pending_tokens: Any = 0  # a GPU tensor once counting starts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            plain = (
                self.model.training
                and not return_outputs
                and self.compute_loss_func is None
                and self.label_smoother is None
                and self.args.loss_type == "nll"
                and not self.aux_loss_enabled
                and self.accelerator.parallelism_config is None
            )
            if not plain:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            out = model(**inputs, fused_lm_head=True)  # TRL's chunked LM head: log-probs without the logits
            count = out.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -out.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
            gather = self.accelerator.gather_for_metrics
            valid = gather(out.label_mask.sum()).sum().clamp(min=1)  # both sums are 0 where nothing is valid
            entropy = gather(out.entropy.detach().sum()).sum() / valid
            accuracy = gather(out.is_top1.sum()).sum() / valid
            self._pending.append(torch.stack([entropy, accuracy]))
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum()
            else:  # padding-free packing: one row of tokens
                # a fill kernel: torch.tensor(n, device=...) would copy n from the host and wait for the GPU
                tokens = gather(torch.full((), inputs["position_ids"].size(1), device=loss.device)).sum()
            self._pending_tokens = self._pending_tokens + tokens // self._tp_size
            return loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self._pending:
                metrics = self._metrics["train"]
                for entropy, accuracy in torch.stack(self._pending).tolist():  # the one read
                    metrics["entropy"].append(entropy)
                    metrics["mean_token_accuracy"].append(accuracy)
                self._total_train_tokens += int(self._pending_tokens)
                metrics["num_tokens"] = [self._total_train_tokens]
                self._pending, self._pending_tokens = [], 0
            super().log(logs, start_time)

    return Trainer
