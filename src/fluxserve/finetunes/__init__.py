"""Finetunes: LoRA adapters an operator adds for a model, which keys then use by name (``finetune_id``) on
the vendor's finetuned routes. ``check`` validates a file before it is stored, ``store`` keeps the records
(the ``finetunes`` table) and the files (the blob store, so every worker can load them), and the bundled
model ships ``outlines``, available on a fresh install. The workers load them with diffusers
(``engines/flux/adapters.py``)."""
