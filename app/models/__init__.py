"""What a model path holds and how to load it, beyond the Hugging Face folder (the default):
``ultralytics.py`` recognises Ultralytics RT-DETR checkpoints (a ``.pt`` file). No torch here."""
