"""Training: the one LoRA trainer (recovery, schedules, QLoRA, the lora criterion) and the chunked LM loss."""
