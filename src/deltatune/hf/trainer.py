"""transformers.Trainer integration: adapter-only checkpoints beside the Trainer's own."""

from __future__ import annotations

from pathlib import Path

import transformers

from ..io.adapter_files import save_adapter


class TrainerCallback(transformers.TrainerCallback):
    """Saves the active adapter to ``<checkpoint>/adapter`` whenever the Trainer saves.

    >>> trainer = Trainer(model=dt.apply(model, config), args=args, ...,
    ...                   callbacks=[deltatune.TrainerCallback()])
    """

    def __init__(self, adapter_name: str = "default", format: str = "deltatune"):
        self.adapter_name = adapter_name
        self.format = format

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "adapter"
            save_adapter(model, folder, self.adapter_name, format=self.format)
        return control
