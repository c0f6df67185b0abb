"""The one training-loop core shared by pretraining, fine-tuning and linear probing, and its building blocks."""
