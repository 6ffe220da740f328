"""transformers.Trainer integration: checkpoints that hold the adapter, not the base model.

Trainer saves a checkpoint with ``model.save_pretrained``, which writes every weight: 91 MB of
MiniLM for a 300 kB LoRA. peft avoids it by wrapping the model in a ``PeftModel`` whose
``save_pretrained`` writes the adapter alone; deltatune keeps the model's own class, so it uses
the hook ``save_pretrained`` already has: ``_keys_to_ignore_on_save``, the keys a model leaves
out of its files. While Trainer logs, evaluates and saves between two steps, it holds every
frozen tensor; at the next step, and when training ends, it is put back.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from torch import nn

from ..io.adapter_files import save_adapter


class TrainerCallback(transformers.TrainerCallback):
    """Makes transformers.Trainer's checkpoints adapter-only, and saves the active adapter to
    ``<checkpoint>/adapter`` whenever the Trainer saves.

    ``checkpoint-N/model.safetensors`` then holds the trainable tensors alone (the adapter and
    ``modules_to_save``, under the model's own names); the optimizer, scheduler and RNG files
    beside it cover those tensors only, so they are small too. Resume as with any Trainer: build
    the model again (base + ``deltatune.apply``) and call ``trainer.train(resume_from_checkpoint=...)``;
    transformers warns that the checkpoint lacks the frozen weights, which the rebuilt model holds.

    >>> trainer = Trainer(model=dt.apply(model, config), args=args, ...,
    ...                   callbacks=[deltatune.TrainerCallback()])
    """

    def __init__(self, adapter_name: str = "default", format: str = "deltatune"):
        self.adapter_name = adapter_name
        self.format = format
        self._own_keys: tuple | None = None  # the model's _keys_to_ignore_on_save while ours are in

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._leave_out_frozen(model)  # Trainer may log, evaluate and save before the next step
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._leave_out_frozen(model)
        return control

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._put_back(model)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._put_back(model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._put_back(model)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "adapter"
            save_adapter(model, folder, self.adapter_name, format=self.format)
        return control

    def _leave_out_frozen(self, model: nn.Module | None) -> None:
        if not isinstance(model, transformers.PreTrainedModel) or self._own_keys is not None:
            return
        own = model._keys_to_ignore_on_save
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model._keys_to_ignore_on_save = set(own or ()) | (set(model.state_dict()) - trainable)
        self._own_keys = (own,)

    def _put_back(self, model: nn.Module | None) -> None:
        if model is not None and self._own_keys is not None:
            model._keys_to_ignore_on_save = self._own_keys[0]
            self._own_keys = None
