"""Training: timestep sampling, the flow-matching step, LoRA setup, and the recipe that runs both experts."""
