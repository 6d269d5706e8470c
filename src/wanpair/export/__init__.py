"""After training: LoRA layouts (inspect / export), applying and merging LoRAs onto the experts."""
